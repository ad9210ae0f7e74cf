"""Shared test settings: where the real CIFAR-10 archive is.

MIXQ_CIFAR10 names it; by default the workplace's `../shared/data/cifar10-jpeg.tar.gz` beside
the repository. Tests that need it skip, with the path in the reason, when it is absent."""
import os
from pathlib import Path

import pytest

CIFAR = Path(os.environ.get("MIXQ_CIFAR10")
             or Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz")
needs_cifar = pytest.mark.skipif(not CIFAR.exists(), reason=f"{CIFAR} not present (set MIXQ_CIFAR10)")
