"""Pretrained encoder weights: by name from the Hugging Face hub (or its local cache), or from a file.

Offline, smp and timm retry the hub with back-off before they give up (docs/design-notes.md: ~26 s and ~49 s).
`hub_access()` asks the hub once, with a short timeout, whether it answers at all; if it does not,
the build runs in huggingface_hub's offline mode, where cached weights still load and missing ones
fail at once — and `build_model` turns that into one line saying what to do.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn

from segdist.errors import UserError

PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class HubProbe:
    """Asks in a daemon thread, from construction on, whether `url` answers an HTTP HEAD within
    `timeout` seconds with a status below 500 (an error status still answers fast; 5xx is what
    huggingface_hub retries with back-off). Proxies from the environment are honoured. Name
    resolution cannot be given a timeout: a thread that takes longer is abandoned. Started before
    smp's slow import, the probe costs no extra time when the hub is down."""

    def __init__(self, url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.url = url
        self.deadline = time.monotonic() + timeout + 0.5
        self._answer: list[bool] = []
        self._thread = threading.Thread(target=self._probe, args=(timeout,), name="hub-probe", daemon=True)
        self._thread.start()

    def _probe(self, timeout: float) -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(self.url, method="HEAD"), timeout=timeout).close()
            self._answer.append(True)
        except urllib.error.HTTPError as exc:
            self._answer.append(exc.code < 500)
        except Exception:  # noqa: BLE001 - DNS failure, refused, timeout, TLS: all mean "no"
            self._answer.append(False)

    def reachable(self) -> bool:
        self._thread.join(max(0.0, self.deadline - time.monotonic()))
        return bool(self._answer and self._answer[0])


def hub_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    return HubProbe(url, timeout).reachable()


def start_hub_probe() -> HubProbe | None:
    """A probe of the hub, or None when huggingface_hub is in offline mode anyway."""
    from huggingface_hub import constants

    return None if constants.HF_HUB_OFFLINE else HubProbe(constants.ENDPOINT)


@contextlib.contextmanager
def hub_access(probe: HubProbe | None):
    """Run a model build that may fetch pretrained weights; yields whether the hub is reachable.
    Unreachable: huggingface_hub is switched to offline mode for the duration (cache only)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or probe is None:
        yield False
        return
    if probe.reachable():
        yield True
        return
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub (constants.is_offline_mode)
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = False


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (loaded with weights_only=True); a
    checkpoint that wraps it under "state_dict" or "model" is unwrapped."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"model.encoder_weights: cannot read {path} as weights ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.encoder_weights: {path} holds no state dict of tensors")
    return state


def load_encoder_file(encoder: nn.Module, path: str, encoder_name: str) -> None:
    """Load `path` into `encoder`: its own state_dict (`torch.save(model.encoder.state_dict(), f)`),
    or a classification checkpoint of the same backbone (extra keys such as the classifier are
    dropped; for timm `tu-` encoders the keys of the timm model inside are tried too). Every
    encoder weight must be found, with its shape."""
    state = read_state_dict(path)
    targets = [encoder] + ([encoder.model] if isinstance(getattr(encoder, "model", None), nn.Module) else [])
    best, best_hits = None, -1
    for target in targets:
        hits = len(set(state) & set(target.state_dict()))
        if hits > best_hits:
            best, best_hits = target, hits
    expected = best.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(
            f"model.encoder_weights: {path} does not hold the {encoder_name} encoder's weights "
            f"({len(missing)} of {len(expected)} missing, e.g. {missing[0]!r}); save them with "
            "torch.save(model.encoder.state_dict(), path)"
        )
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"model.encoder_weights: {path}: {k} has shape {tuple(state[k].shape)}, "
                        f"the {encoder_name} encoder needs {tuple(expected[k].shape)}")
    best.load_state_dict({k: state[k] for k in expected})


def is_local_file(weights: str) -> bool:
    return Path(weights).expanduser().is_file()
