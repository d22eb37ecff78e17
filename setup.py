"""Build script: packages and the optional C extensions (cffi).

Metadata and dependencies are in pyproject.toml.  The C fast paths
(nptcore._npt_c, hv._trace_c) are optional: when they cannot be compiled
(no compiler, no headers) the install still succeeds with a warning and the
packages fall back to their pure-Python twins.
"""
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

# nptcore._npt_c first, then every other cffi builder in csrc/ (build_*.py
# defining `ffibuilder`: hv._trace_c, hv._vcpu_c, ...)
CFFI_MODULES = ["csrc/build_npt.py:ffibuilder"] + [
    "csrc/%s:ffibuilder" % name
    for name in sorted(os.listdir(os.path.join(HERE, "csrc")))
    if name.startswith("build_") and name.endswith(".py") and name != "build_npt.py"
]


def _warn(what, exc):
    sys.stderr.write(
        "\nWARNING: could not build the C extension %s (%s: %s).\n"
        "         Installing without it: the pure-Python fallback is used.\n\n"
        % (what, type(exc).__name__, exc))


class OptionalBuildExt(build_ext):
    """build_ext whose failures are warnings, not errors."""

    def run(self):
        for ext in self.extensions:
            # distutils then turns a compile failure into a warning, and
            # setuptools skips the missing file when copying in place
            ext.optional = True
        try:
            super().run()
        except Exception as exc:          # no compiler, bad toolchain, ...
            _warn("modules", exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn(ext.name, exc)

    def copy_extensions_to_source(self):
        # skip the extensions that failed to build (editable/in-place installs)
        try:
            super().copy_extensions_to_source()
        except Exception as exc:
            _warn("modules (copy in place)", exc)


setup(
    packages=find_packages(
        include=["hv", "hv.*", "psp_firmware", "psp_firmware.*",
                 "nptcore", "nptcore.*", "guests"]),
    # the bundled guests are built from source on first use (`hv boot hello`)
    package_data={"guests": ["src/*", "README.md"]},
    cffi_modules=CFFI_MODULES,
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
