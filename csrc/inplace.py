"""Build one cffi extension and drop it into the source tree.

`python csrc/build_X.py` (a development shortcut; `pip install -e .` does the
same for every module) compiles in a scratch directory, so setuptools never
looks at the tree's layout, then replaces the module's old copies in place.
"""
import os
import shutil
import tempfile


def compile_in_place(ffi, root, package, module):
    dest = os.path.join(root, package)
    with tempfile.TemporaryDirectory() as tmp:
        so = ffi.compile(tmpdir=tmp, verbose=False)
        for old in os.listdir(dest):
            if old.startswith(module + ".") and old.endswith((".so", ".pyd")):
                os.remove(os.path.join(dest, old))
        target = os.path.join(dest, os.path.basename(so))
        shutil.copy(so, target + ".tmp")
        os.replace(target + ".tmp", target)
    return target
