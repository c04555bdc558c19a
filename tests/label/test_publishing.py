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


def test_the_served_copy_keeps_the_size_network_beside_the_model(tmp_path):
    """``ServedModel.install`` copies ``size_<stem>.pt`` with the model (as ``size_mmcs.pt``), so the server's ``auto``
    searches with it as ``mmcs infer`` does; weights the server trains and publishes search with themselves (the size
    network goes with the previous weights); a model without one is served without one."""
    import torch

    from mmcs_monai.label.model import ServedModel
    from mmcs_monai.networks import CPnet

    source = tmp_path / "shipped" / "generalist.pt"
    source.parent.mkdir()
    torch.save(CPnet(nbase=(2, 8, 16, 32)).state_dict(), source)
    torch.save(CPnet(nbase=(2, 4, 8, 16)).state_dict(), source.parent / "size_generalist.pt")
    served = ServedModel.install(source, tmp_path / "app" / "model", device="cpu")
    assert sorted(p.name for p in (tmp_path / "app" / "model").iterdir()) == ["mmcs.pt", "size_mmcs.pt"]
    assert served.network().size_network.nbase == [2, 4, 8, 16]
    trained = tmp_path / "trained.pt"  # weights the server trained search sizes with themselves
    torch.save(CPnet(nbase=(2, 8, 16, 32)).state_dict(), trained)
    served.publish(trained)
    assert sorted(p.name for p in (tmp_path / "app" / "model").iterdir()) == ["mmcs.pt", "previous.pt", "size_previous.pt"]
    assert served.network().size_network is None

    (source.parent / "size_generalist.pt").unlink()
    assert ServedModel.install(source, tmp_path / "other", device="cpu").network().size_network is None
