from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import cliptrase


@pytest.fixture(scope="session")
def tiny():
    """The 3-block test ViT with fixed random weights: every code path, in milliseconds."""
    return cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def vit_b16():
    """ViT-B/16 with fixed random weights, for tests where real shapes matter."""
    return cliptrase.load_segmentor("ViT-B-16", pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    return skimage.data.chelsea()


def parity_pixels(seg, photo: np.ndarray, size: int) -> torch.Tensor:
    """The reference evaluation input (spec section 9) as a (1, 3, S, S) tensor."""
    return cliptrase.parity_transform(size, seg.mean, seg.std)(Image.fromarray(photo))[None]


@pytest.fixture(scope="module")
def s3_endpoint(monkeypatch_module):
    """A real S3 server (moto) on loopback; s3fs reaches it through ``endpoint_url``."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch_module.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch_module.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp
