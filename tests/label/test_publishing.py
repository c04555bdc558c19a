"""The train task's rules (no MONAI Label needed): the labelled split and the publish decision."""

import pytest

from mmcs_monai.label.publishing import should_publish, split_labelled


def items(n):
    return [{"id": f"img{i}"} for i in range(n)]


def test_few_labels_validate_on_the_training_images():
    for n in (1, 2, 4):
        train, val = split_labelled(items(n), 0.2, 5, seed=0)
        assert train == val == items(n)
    train, val = split_labelled(items(8), 0.0, 5, seed=0)  # no hold-out asked for
    assert train == val == items(8)


@pytest.mark.parametrize("n, fraction, n_val", [(5, 0.2, 1), (10, 0.2, 2), (10, 0.25, 2), (20, 0.5, 10), (6, 0.01, 1)])
def test_hold_out_is_disjoint_complete_and_seeded(n, fraction, n_val):
    train, val = split_labelled(items(n), fraction, 5, seed=3)
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert len(val) == n_val and len(train) == n - n_val
    assert not set(ids(train)) & set(ids(val)) and sorted(ids(train) + ids(val)) == sorted(ids(items(n)))
    assert split_labelled(items(n), fraction, 5, seed=3) == (train, val)  # same seed, same split
    others = {tuple(ids(split_labelled(items(n), fraction, 5, seed=s)[1])) for s in range(10)}
    assert len(others) > 1  # the seed matters: not always the first or last images


def test_publish_only_when_not_worse_unless_always():
    assert should_publish("if_better", 0.71, 0.70) and should_publish("if_better", 0.70, 0.70)
    assert not should_publish("if_better", 0.69, 0.70)
    assert not should_publish("if_better", None, 0.70)  # no validation ran: nothing says it is better
    assert should_publish("always", 0.1, 0.9) and should_publish("always", None, None)
    with pytest.raises(ValueError, match="if_better"):
        should_publish("sometimes", 0.9, 0.1)
