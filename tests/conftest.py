import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from nptcore import available_backends  # noqa: E402

BACKENDS = ["c", "python"]
PSP_TRANSPORTS = ["inprocess", "process"]


def _backend_param(name):
    marks = [] if name in available_backends() else [pytest.mark.skip(reason=f"{name} backend not built")]
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[_backend_param(b) for b in BACKENDS])
def backend(request):
    return request.param


@pytest.fixture(params=PSP_TRANSPORTS)
def psp_transport(request):
    return request.param


@pytest.fixture
def vmm(backend, psp_transport):
    from hv import Vmm
    v = Vmm(host_mem=128 << 20, backend=backend, psp=psp_transport)
    yield v
    v.close()


@pytest.fixture(scope="session")
def guests():
    """{name: path} of the bundled guest images, built once (skip without gcc)."""
    import guests.build as gbuild
    try:
        return gbuild.build_all()
    except gbuild.BuildError as e:
        pytest.skip(str(e))
