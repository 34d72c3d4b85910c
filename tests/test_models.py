"""Models: our unet/segnet, smp architectures with arch_args, pretrained weights from a file, the
fast offline failure (with a hub that never answers), the scale options, the weights' EMA, and the
state_dict shapes of a meta-device build."""

from __future__ import annotations

import dataclasses
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from segdist.errors import UserError
from segdist.models import build_model, prepare_model, state_shapes
from segdist.models.ema import ModelEMA
from segdist.models.pretrained import hub_reachable
from segdist.models.unet import UPSAMPLES
from segdist.recipe import ModelConfig

# Hub weights are requested on purpose where the test is that the request fails, fast and clearly:
# nothing here can download them.
HUB_WEIGHTS = "imagenet"


def own(arch: str, **args) -> ModelConfig:
    return ModelConfig(arch=arch, encoder=None, arch_args=args)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, args", [("unet", {"upsample": u}) for u in UPSAMPLES]
                         + [("unet", {"skips": False, "norm": "group"}), ("unet", {"norm": "instance", "depth": 2}),
                            ("segnet", {}), ("segnet", {"norm": "none", "depth": 3})])
def test_own_models_keep_any_input_size(arch, args):
    model = build_model(own(arch, width=8, **args), 3)
    for shape in [(2, 3, 32, 32), (1, 3, 37, 50)]:
        out = model(torch.randn(*shape))
        assert out.shape == (shape[0], 3, *shape[2:])
    assert {"encoder", "decoder", "head"} <= {n for n, _ in model.named_children()}


def test_encoder_decoder_differs_from_unet_only_by_skips():
    """The birds assignment's comparison: the same layers and widths, the decoder blocks' first convolution
    taking the concatenated skip (2w in) instead of w."""
    width, depth = 8, 3
    unet = build_model(own("unet", width=width, depth=depth, upsample="bilinear"), 1)
    plain = build_model(own("unet", width=width, depth=depth, upsample="bilinear", skips=False), 1)
    extra = sum(3 * 3 * (width * 2**i) ** 2 for i in range(depth))
    assert params(unet) - params(plain) == extra
    assert [n for n, _ in unet.named_modules()] == [n for n, _ in plain.named_modules()]


def test_unet_sizes_match_notebook_003():
    """The Cityscapes low-resolution study reported ~7.7M parameters for start_channels 16, depth 4: our width 32 (its first level
    had twice start_channels; its depth 2 / 3 runs had 120k / ~2M: width 16 / 32)."""
    assert params(build_model(own("unet", width=32, depth=4), 19)) == pytest.approx(7.7e6, rel=0.02)
    assert params(build_model(own("unet", width=32, depth=3), 19)) == pytest.approx(2.0e6, rel=0.05)
    assert params(build_model(own("unet", width=16, depth=2), 19)) == pytest.approx(1.2e5, rel=0.05)


def test_segnet_as_notebook_001():
    model = build_model(own("segnet", width=16, depth=4), 1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 128, 128, 128,
                                               128, 64, 64, 32, 32, 16, 16, 16, 1]
    assert sum(isinstance(m, nn.MaxUnpool2d) for m in model.modules()) == 1  # one module, used 4 times


def test_smp_architectures_take_arch_args():
    unetpp = build_model(ModelConfig(arch="UnetPlusPlus", encoder="resnet18", decoder_channels=[64, 32, 16, 16, 16],
                                     arch_args={"decoder_attention_type": "scse"}), 21)
    assert any(type(m).__name__ == "SCSEModule" for m in unetpp.modules())
    segformer = build_model(ModelConfig(arch="Segformer", encoder="mit_b0",
                                        arch_args={"decoder_segmentation_channels": 512}), 21)
    assert segformer.segmentation_head[0].in_channels == 512
    assert segformer(torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)
    timm = build_model(ModelConfig(arch="DeepLabV3Plus", encoder="tu-mobilenetv3_small_050"), 1)
    assert timm(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)


@pytest.mark.parametrize("cfg, needle", [
    (own("unet", widht=8), "'unet' has no argument 'widht'; its arguments (defaults): width = 32, depth = 4"),
    (own("unet", upsample="deconv"), "valid: transpose, bilinear, nearest, maxunpool"),
    (own("segnet", norm="layer"), "valid: batch, instance, group, none"),
    (own("unet", width=8.0), "model.arch_args.width must be a int"),
    (own("segnet", upsample="maxunpool"), "'segnet' has no argument 'upsample'"),
    (ModelConfig(arch="unet", encoder=None, encoder_weights=HUB_WEIGHTS), "trained from scratch"),
    (ModelConfig(arch="unet", encoder=None, decoder_channels=[8]), "model.decoder_channels is for smp"),
    (ModelConfig(arch="UNet"), "names are case-sensitive); did you mean 'Unet' (smp) or 'unet' (ours)?"),
    (ModelConfig(arch="deeplabv3plus"), "did you mean 'DeepLabV3Plus' (smp)?"),
    (ModelConfig(arch="UNett"), "valid names: DPT, DeepLabV3, DeepLabV3Plus, FPN"),
    (ModelConfig(arch="Unet", encoder="resnet35"), "smp has no encoder 'resnet35'; valid names: resnet18"),
    (ModelConfig(arch="Unet", encoder="tu-resnet35x"), "timm has no model 'resnet35x'"),
    (ModelConfig(arch="Unet", encoder="resnet18", encoder_weights="imagenet22k"), "known: imagenet"),
    (ModelConfig(arch="Unet", encoder="resnet18", encoder_weights="weights/r18.pth"), "file weights/r18.pth not found"),
    (ModelConfig(arch="Segformer", encoder="mit_b0", arch_args={"decoder_attention_type": "scse"}),
     "Segformer takes no argument 'decoder_attention_type'; valid: encoder_depth"),
    (ModelConfig(arch="Unet", arch_args={"classes": 3}), "takes no argument 'classes' (it is model.classes)"),
    (ModelConfig(arch="Unet", arch_args={"encoder_name": "x"}), "(it is model.encoder)"),
])
def test_bad_model_settings_name_the_key(cfg, needle):
    with pytest.raises(UserError) as err:
        build_model(cfg, 2)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_encoder_weights_from_a_local_file(tmp_path):
    donor = build_model(ModelConfig(arch="Unet", encoder="resnet18"), 3)
    torch.save(donor.encoder.state_dict(), tmp_path / "r18.pth")
    model = build_model(ModelConfig(arch="FPN", encoder="resnet18", encoder_weights=str(tmp_path / "r18.pth")), 5)
    for key, value in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    # classification checkpoints as users download them: torchvision's (smp encoder), timm's (tu- encoder)
    import timm
    import torchvision
    from safetensors.torch import save_file

    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "torchvision_r18.pth")
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(tmp_path / "torchvision_r18.pth")), 2)
    assert all(torch.equal(v, tv.state_dict()[k]) for k, v in model.encoder.state_dict().items())
    tm = timm.create_model("resnet18")
    save_file(tm.state_dict(), str(tmp_path / "timm_r18.safetensors"))
    model = build_model(ModelConfig(arch="Unet", encoder="tu-resnet18", encoder_weights=str(tmp_path / "timm_r18.safetensors")), 2)
    assert all(torch.equal(v, tm.state_dict()[k]) for k, v in model.encoder.model.state_dict().items())
    torch.save({"state_dict": build_model(ModelConfig(arch="Unet", encoder="resnet50"), 3).encoder.state_dict()},
               tmp_path / "r50.pth")  # a wrapped checkpoint of another backbone
    with pytest.raises(UserError, match="has shape .* the resnet18 encoder needs"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(tmp_path / "r50.pth")), 3)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"does not hold the resnet18 encoder's weights \(\d+ of \d+ missing"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(tmp_path / "other.pth")), 3)


class SilentServer:
    """Accepts TCP connections and never answers: a hub behind a firewall that drops packets."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        try:
            while True:
                self.conns.append(self.sock.accept()[0])
        except OSError:
            pass

    def __exit__(self, *exc):
        self.sock.close()
        for c in self.conns:
            c.close()


def answering(status: int) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


def test_hub_probe():
    with SilentServer() as hub:
        start = time.perf_counter()
        assert not hub_reachable(hub.url, timeout=1.0)
        assert time.perf_counter() - start < 2.0
    for status, reachable in ((200, True), (404, True), (503, False)):  # 5xx: huggingface_hub would retry
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), answering(status))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            assert hub_reachable(f"http://127.0.0.1:{server.server_port}", timeout=1.0) is reachable, status
        finally:
            server.shutdown()
            server.server_close()
    with pytest.raises(UserError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=HUB_WEIGHTS), 2)


@pytest.mark.slow
def test_offline_pretrained_request_fails_fast_without_hf_hub_offline(tiny_recipe, tmp_path):
    """HF_HUB_OFFLINE unset and a hub that never answers (without the probe, smp waited > 5 min on
    this): one line, exit 2, under 10 s including Python start-up and imports (~6 s on an idle
    2-core machine). Imports alone take longer when the machine is loaded, so the bound is also
    "within 5 s of a process that only imports the same modules"."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import segdist.train, segmentation_models_pytorch"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=120)
    imports = time.perf_counter() - start
    with SilentServer() as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(ROOT / "launch" / "train.py"), str(tiny_recipe),
             "--set", "model.encoder_weights=imagenet", "--set", "model.encoder=resnet34"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        elapsed = time.perf_counter() - start
    print(f"offline failure after {elapsed:.1f} s (imports alone {imports:.1f} s): {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"not in the local cache and {hub.url} is unreachable" in lines[0]
    assert 'model.encoder_weights = "null"' in lines[0] and "to its path" in lines[0]
    assert elapsed < max(10.0, imports + 5.0)
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_scale_options():
    cfg = own("unet", width=4, depth=2)
    plain = build_model(cfg, 2)
    keys = list(plain.state_dict())
    model = prepare_model(build_model(cfg, 2), ModelConfig(arch="unet", encoder=None, channels_last=True, sync_bn=True),
                          "cpu", 2)
    conv = model.encoder.stem[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # gloo cannot (docs/design-notes.md)
    synced = prepare_model(build_model(cfg, 2), ModelConfig(arch="unet", encoder=None, sync_bn=True), "cuda", 2)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) and list(synced.state_dict()) == keys
    single = prepare_model(build_model(cfg, 2), ModelConfig(arch="unet", encoder=None, sync_bn=True), "cuda", 1)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in single.modules())
    # compile in place: same module, same state_dict keys (checkpoints stay loadable); no forward
    # here, inductor takes ~45 s to compile even this on a 2-core CPU
    compiled = prepare_model(plain, ModelConfig(arch="unet", encoder=None, compile=True), "cpu", 1)
    assert compiled is plain and compiled._compiled_call_impl is not None and list(compiled.state_dict()) == keys


def test_ema_follows_applied_optimizer_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema.attach(opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(3):
        model(torch.randn(4, 2)).pow(2).sum().backward()
        opt.step()  # the hook updates the average
        opt.zero_grad()
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    assert ema.updates == 3
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7)
    assert ema.module.state_dict()["1.num_batches_tracked"] == 3
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    again = ModelEMA(model, decay=0.9)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.updates == 3 and all(torch.equal(a, b) for a, b in
                                      zip(again.module.state_dict().values(), ema.module.state_dict().values()))


@pytest.mark.parametrize("cfg", [own("unet", width=4, depth=2),
                                 ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=HUB_WEIGHTS,
                                             decoder_channels=[32, 16, 16, 8, 8])])
def test_state_shapes_are_those_of_the_built_model(cfg):
    # Hub weights are dropped: the shapes need none (and a checkpoint's weights replace them anyway).
    shapes = state_shapes(cfg, 3)
    built = build_model(dataclasses.replace(cfg, encoder_weights=None), 3).state_dict()
    assert shapes == {k: tuple(v.shape) for k, v in built.items()}
    assert state_shapes(ModelConfig(arch="UNett"), 3) is None  # the build for real says what is wrong
