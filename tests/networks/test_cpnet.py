"""CPnet: shapes, parity with cellpose.resnet_torch.CPnet, checkpoint loading."""

import pytest
import torch

from helpers import require_module
from mmcs_monai.networks import CPnet, ModelFileError, load_cellpose_checkpoint, load_model
from mmcs_monai.networks.cpnet import decode_subset_table

NBASE = [2, 32, 64, 128, 256]
SMALL = [2, 8, 16, 32]


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode parity really tests them."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1.0 + 0.1 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


@pytest.fixture(scope="module")
def cellpose_net():
    resnet_torch = require_module("cellpose.resnet_torch")
    torch.manual_seed(0)
    net = resnet_torch.CPnet(nbase=list(NBASE), nout=3, sz=3, diam_mean=17.0)
    _randomise_bn(net)
    with torch.no_grad():
        net.diam_labels.fill_(21.5)
    return net.eval()


@pytest.mark.parametrize("shape", [(70, 93), (16, 16), (5, 3), (64, 64)])
def test_output_shape_any_size(shape):
    net = CPnet(nbase=SMALL).eval()
    x = torch.rand(2, 2, *shape)
    with torch.no_grad():
        out, style = net.forward_with_style(x)
        out2 = net(x)
    assert out.shape == (2, 3, *shape) and out.dtype == torch.float32
    assert style.shape == (2, SMALL[-1])
    torch.testing.assert_close(style.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out, out2)


def test_train_mode_backward():
    net = CPnet(nbase=SMALL).train()
    out = net(torch.rand(2, 2, 40, 40))
    out.mean().backward()
    assert net.output[2].weight.grad is not None
    assert not net.diam_mean.requires_grad and net.diam_mean.grad is None


def test_bad_input_channels():
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        CPnet(nbase=SMALL)(torch.rand(1, 3, 32, 32))


def test_diameters():
    net = CPnet(nbase=SMALL, diam_mean=17.0)
    assert net.diam_mean.item() == 17.0 and net.diam_labels.item() == 17.0
    net.set_diam_labels(23.25)
    assert net.diam_labels.item() == 23.25
    assert net.state_dict()["diam_labels"].shape == (1,)


def test_state_dict_keys_match_cellpose(cellpose_net):
    ours = CPnet(nbase=NBASE).state_dict()
    theirs = cellpose_net.state_dict()
    assert [k for k in ours if k != "subset_diameters"] == list(theirs)
    assert decode_subset_table(ours["subset_diameters"]) == {}  # our subset-diameter table, a tensor
    assert all(torch.is_tensor(v) for v in ours.values())  # readable by MONAI's copy_model_state
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


@pytest.mark.parametrize("size", [64, 128])
def test_parity_with_cellpose(cellpose_net, size):
    ours = CPnet(nbase=NBASE)
    ours.load_state_dict(cellpose_net.state_dict(), strict=True)
    ours.eval()
    assert ours.diam_mean.item() == 17.0 and ours.diam_labels.item() == 21.5
    x = torch.randn(2, 2, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cellpose_net(x)  # (flows+cellprob [B,3,H,W], style [B,256], encoder features)
        out, style = ours.forward_with_style(x)
    assert isinstance(ref, tuple) and len(ref) == 3
    assert (out - ref[0]).abs().max() < 1e-4
    assert (style - ref[1]).abs().max() < 1e-4


def test_padding_matches_cellpose_zero_padding(cellpose_net):
    """Odd sizes: same as Cellpose's net on the centred zero-padded image, cropped back."""
    transforms = require_module("cellpose.transforms")
    ours = CPnet(nbase=NBASE)
    ours.load_state_dict(cellpose_net.state_dict())
    ours.eval()
    ly, lx = 70, 93
    x = torch.randn(1, 2, ly, lx, generator=torch.Generator().manual_seed(2))
    y1, y2, x1, x2 = transforms.get_pad_yx(ly, lx, div=16, extra=0)
    with torch.no_grad():
        ref, ref_style, _ = cellpose_net(torch.nn.functional.pad(x, (x1, x2, y1, y2)))
        out, style = ours.forward_with_style(x)
    assert (out - ref[:, :, y1 : y1 + ly, x1 : x1 + lx]).abs().max() < 1e-4
    assert (style - ref_style).abs().max() < 1e-4


def test_cellpose_checkpoint_roundtrip(cellpose_net, tmp_path):
    path = tmp_path / "cp3_model"
    cellpose_net.save_model(str(path))  # plain state dict, as Cellpose writes its models
    net = load_cellpose_checkpoint(path).eval()
    assert net.nbase == NBASE and net.nout == 3 and net.sz == 3
    assert net.diam_mean.item() == 17.0 and net.diam_labels.item() == 21.5
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert (net(x) - cellpose_net(x)[0]).abs().max() < 1e-4
    # loading into an existing network of the right shape
    other = load_cellpose_checkpoint(path, net=CPnet(nbase=NBASE))
    torch.testing.assert_close(other.state_dict()["output.2.weight"], cellpose_net.state_dict()["output.2.weight"])


@pytest.mark.parametrize("key", ["network", "model"])
def test_trainer_checkpoint_roundtrip(tmp_path, key):
    src = CPnet(nbase=SMALL, diam_mean=25.0)
    src.set_diam_labels(12.0)
    opt = torch.optim.Adam(p for p in src.parameters() if p.requires_grad)
    path = tmp_path / "ckpt.pt"
    torch.save({key: src.state_dict(), "optimizer": opt.state_dict(), "trainer": {"epoch": 3}}, path)
    net = load_cellpose_checkpoint(path)
    assert net.nbase == SMALL and net.diam_mean.item() == 25.0 and net.diam_labels.item() == 12.0
    for k, v in src.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v)


def test_ddp_prefix_is_stripped(tmp_path):
    src = CPnet(nbase=SMALL)
    path = tmp_path / "ddp.pt"
    torch.save({"network": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    assert load_cellpose_checkpoint(path).nbase == SMALL


def test_missing_file_error(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ModelFileError, match="nope.pt: model file not found"):
        load_cellpose_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="nope.pt: model file is empty"):
        load_model(path)


def test_not_a_torch_file_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ModelFileError, match="notes.txt.*not a readable torch checkpoint"):
        load_cellpose_checkpoint(path)


def test_no_state_dict_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"optimizer": {"lr": 1.0}}, path)
    with pytest.raises(ModelFileError, match="other.pt.*no network state dict"):
        load_cellpose_checkpoint(path)


def test_mismatched_keys_error(tmp_path):
    state = CPnet(nbase=SMALL).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["output.2.bias"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"broken\.pt.*missing keys \['output\.2\.bias'\].*unexpected keys \['extra"):
        load_cellpose_checkpoint(path)
    # shape mismatch when loading into a differently sized network
    torch.save(CPnet(nbase=SMALL).state_dict(), path)
    with pytest.raises(ModelFileError, match="broken.pt.*shape mismatches"):
        load_cellpose_checkpoint(path, net=CPnet(nbase=[2, 8, 16, 64]))


def test_old_checkpoint_without_diameters(tmp_path):
    state = CPnet(nbase=SMALL).state_dict()
    del state["diam_mean"], state["diam_labels"]
    path = tmp_path / "old.pt"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="diam_mean"):
        net = load_cellpose_checkpoint(path, diam_mean=17.0)
    assert net.diam_mean.item() == 17.0


def test_release_file_is_half_the_size_and_loads_as_float32(tmp_path):
    from mmcs_monai.networks import save_release_file

    torch.manual_seed(0)
    net = CPnet(nbase=SMALL, diam_mean=30.0)
    _randomise_bn(net)
    net.set_diam_labels(23.37)
    net.set_subset_diameters({"nuclei": 17.5})
    full = tmp_path / "full.pt"
    torch.save(net.state_dict(), full)
    release = save_release_file(full, tmp_path / "out" / "release.pt")
    assert release.stat().st_size < 0.6 * full.stat().st_size
    state = torch.load(release, weights_only=True)
    assert state["diam_labels"].dtype == torch.float32 and state["output.2.weight"].dtype == torch.float16
    loaded = load_model(release)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.diam_labels.item() == pytest.approx(23.37) and loaded.diameter_for("nuclei") == pytest.approx(17.5)
    x = torch.rand(1, 2, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x), atol=2e-2, rtol=1e-2)


def test_a_size_network_beside_the_model_file_is_attached_by_load_model_only(tmp_path):
    """``size_<stem>.pt`` beside a model file (Cellpose's ``size_<model>.npy`` convention): :func:`load_model` attaches
    it in eval mode, outside the module tree (state dict, parameters and a training load see the model alone); a
    model without one has none; a size network file that does not load is an error naming that file."""
    from mmcs_monai.networks import size_network_file

    torch.manual_seed(0)
    main, small = CPnet(nbase=NBASE), CPnet(nbase=SMALL)
    _randomise_bn(main, 1)
    _randomise_bn(small, 2)
    model = tmp_path / "generalist.pt"
    torch.save(main.state_dict(), model)
    assert load_model(model).size_network is None
    assert size_network_file(model) == tmp_path / "size_generalist.pt"
    torch.save(small.state_dict(), tmp_path / "size_generalist.pt")

    loaded = load_model(model)
    assert loaded.nbase == NBASE and loaded.size_network.nbase == SMALL and not loaded.size_network.training
    x = torch.rand(1, 2, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.size_network(x), small.eval()(x))
        torch.testing.assert_close(loaded(x), main.eval()(x))
    assert loaded.state_dict().keys() == main.state_dict().keys()
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in main.parameters())
    assert load_cellpose_checkpoint(model, net=CPnet(nbase=NBASE)).size_network is None  # the bundle's load_pretrained

    (tmp_path / "size_generalist.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"size_generalist\.pt"):
        load_model(model)
