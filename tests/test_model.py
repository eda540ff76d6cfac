"""The attention U-Net: its layout, its size worked out from the channel plan, output shapes, and
the input-size rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny, train_tiny
from torch import nn

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]


def _residual_block(c_in: int, c_out: int) -> int:
    """Two bias-free 3x3 convolutions with batch norm (2 parameters per channel each), and a 1x1
    convolution with batch norm on the shortcut when the widths differ."""
    convs = 9 * c_in * c_out + 9 * c_out * c_out + 2 * 2 * c_out
    return convs + (c_in * c_out + 2 * c_out if c_in != c_out else 0)


def expected_parameters(base: int, depth: int) -> int:
    """The parameter count of the channel plan, worked out layer by layer."""
    widths = [base * 2**i for i in range(depth)]
    total, previous = 0, 1
    for width in widths:  # encoder
        total += _residual_block(previous, width)
        previous = width
    total += _residual_block(previous, base * 2**depth)  # bridge
    total += 2 * 7 * 7 + 1  # spatial attention: a 7x7 convolution from 2 maps to 1, with bias
    previous = base * 2**depth
    for width in reversed(widths):  # 2x2 transposed convolution with bias, then a residual block
        total += 4 * previous * width + width + _residual_block(2 * width, width)
        previous = width
    return total + previous + 1  # the 1x1 head, with bias


@pytest.mark.parametrize(("base", "depth"), [(64, 4), (16, 4), (8, 3), (4, 2)])
def test_parameter_count_follows_from_the_channel_plan(base, depth):
    model = ku.AttentionUNet(base_channels=base, depth=depth)
    assert ku.count_parameters(model) == expected_parameters(base, depth)


def test_default_model_layout():
    model = ku.build_model(ku.Config())
    assert [e.body[0].out_channels for e in model.encoders] == [64, 128, 256, 512]
    assert model.bridge.body[0].out_channels == 1024
    assert isinstance(model.attention, ku.SpatialAttention)
    assert [u.out_channels for u in model.upsamplers] == [512, 256, 128, 64]
    assert all(isinstance(u, nn.ConvTranspose2d) for u in model.upsamplers)
    assert [d.body[0].in_channels for d in model.decoders] == [1024, 512, 256, 128]
    assert model.head.kernel_size == (1, 1) and model.head.out_channels == 1
    block = model.encoders[0].body
    kinds = [type(layer) for layer in block]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert block[3].p == 0.2
    assert ku.count_parameters(model) == expected_parameters(64, 4)


@pytest.mark.parametrize(("width", "depth", "size"), [(4, 2, 32), (8, 3, 48), (4, 4, 64), (8, 4, 128)])
def test_output_shape(width, depth, size):
    model = ku.AttentionUNet(base_channels=width, depth=depth).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 1, size, size)


def test_non_square_input_and_bad_size():
    model = ku.AttentionUNet(base_channels=4, depth=2).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 64)).shape == (1, 1, 32, 64)
        with pytest.raises(ValueError, match="multiple of 4"):
            model(torch.rand(1, 1, 30, 32))


def test_spatial_attention_gates_in_unit_interval():
    att = ku.SpatialAttention()
    x = torch.ones(1, 3, 8, 8)
    y = att(x)
    assert y.shape == x.shape and (y > 0).all() and (y < 1).all()


def test_channels_last_on_the_cpu_changes_speed_not_results():
    model = ku.AttentionUNet(base_channels=4, depth=2).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        fast = model(x)
        model.cpu_channels_last = False
        plain = model(x)
    assert fast.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_checkpoints_record_the_network_and_load_model_rebuilds_it(phantom_data, tmp_path):
    """A peer network trained by train_model is rebuilt by load_model from its checkpoint alone; an
    unregistered network is refused before training, and an unknown one on loading."""
    import kidneyseg_studies as ks

    ks.register_peers()
    config = tiny(num_epochs=1, base_channels=4)
    peer = ku.build_model(config, "monai-basicunet")
    train_tiny(config, phantom_data, tmp_path / "peer", peer)
    model, _, checkpoint = ku.load_model(tmp_path / "peer" / ku.BEST_MODEL_NAME)
    assert checkpoint["architecture"] == "monai-basicunet" and type(model) is type(peer)
    for (name, a), b in zip(peer.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a.cpu(), b), name
    ours = ku.build_model(config)
    train_tiny(config, phantom_data, tmp_path / "ours", ours)
    assert ku.load_checkpoint(tmp_path / "ours" / ku.BEST_MODEL_NAME)["architecture"] == "AttentionUNet"

    class Unregistered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="not a registered architecture"):
        train_tiny(config, phantom_data, tmp_path / "unregistered", Unregistered())
    assert not (tmp_path / "unregistered" / ku.BEST_MODEL_NAME).exists()
    stored = ku.load_checkpoint(tmp_path / "peer" / ku.BEST_MODEL_NAME)
    stored["architecture"] = "someone-elses-net"
    ku.save_checkpoint(stored, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match="Unknown architecture 'someone-elses-net'.*register_peers"):
        ku.load_model(tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match="it trained the network monai-basicunet, not AttentionUNet"):
        train_tiny(config.with_parameters(NUM_EPOCHS=2), phantom_data, tmp_path / "peer", ours, resume=True)


def test_checkpoints_without_a_network_record_load_as_the_attention_unet():
    """The committed cross-validation folds predate the record: they load as our network."""
    path = REPO / "benchmarks" / "results" / "cross_validation_alpha075" / "fold_0_model.pth"
    assert "architecture" not in ku.load_checkpoint(path)
    model, config, _ = ku.load_model(path)
    assert isinstance(model, ku.AttentionUNet) and config.base_channels == 16
