"""SHA-256 throughput and ns per NPT walk (C batch, C single, Python, floor)."""
import gc
import hashlib
import random
import time
from array import array
from hv.bench.common import MiB, PAGE, _LEAF, _NONLEAF, _best, _fmt_size


def bench_sha256(p):
    buf = bytes(16 * MiB)
    dt = _best(lambda: hashlib.sha256(buf).digest(), 3)
    page = bytes(PAGE)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        hashlib.sha256(page).digest()
    per_page = (time.perf_counter() - t0) / n
    return {"sha256_mb_s": len(buf) / dt / 1e6, "sha256_us_per_4k_page": per_page * 1e6}


# ---------------------------------------------------------------------------
# walks
class DenseTable:
    """A dense 4-level table mapping GPA 0..size with 4 KiB leaves, written
    straight into host memory (no PSP: the walk is what is measured)."""

    def __init__(self, size):
        from hv.vmm.hostmem import HostMemory
        self.size = size
        npages = size // PAGE
        n_pt = max(1, npages // 512)
        n_pd = (n_pt + 511) // 512
        n_pdpt = (n_pd + 511) // 512
        n_tables = 1 + n_pdpt + n_pd + n_pt
        self.data_base = 16 * PAGE
        self.data_frames = 1024
        tables_base = self.data_base + self.data_frames * PAGE
        mem_size = tables_base + n_tables * PAGE + MiB
        mem_size = (mem_size + MiB - 1) // MiB * MiB
        self.mem = HostMemory(max(mem_size, 64 * MiB))
        buf = self.mem.buf
        nxt = [tables_base]

        def take():
            h = nxt[0]
            nxt[0] += PAGE
            return h
        self.root = take()
        pdpts = [take() for _ in range(n_pdpt)]
        pds = [take() for _ in range(n_pd)]
        pts = [take() for _ in range(n_pt)]
        for i, h in enumerate(pdpts):
            buf[self.root + 8 * i:self.root + 8 * i + 8] = (h | _NONLEAF).to_bytes(8, "little")
        self._fill_parents(buf, pdpts, pds)
        self._fill_parents(buf, pds, pts)
        per_pt = min(512, npages)
        for k, h in enumerate(pts):
            first = self.data_base + ((k * 512) % self.data_frames) * PAGE
            v = first | _LEAF
            buf[h:h + 8 * per_pt] = array("Q", range(v, v + per_pt * PAGE, PAGE)).tobytes()
        self.n_tables = n_tables

    @staticmethod
    def _fill_parents(buf, parents, children):
        for j, p in enumerate(parents):
            kids = children[j * 512:(j + 1) * 512]
            buf[p:p + 8 * len(kids)] = array("Q", [c | _NONLEAF for c in kids]).tobytes()

    def random_gpas(self, n, seed=1):
        """n uniformly random GPAs below size (a power of two), and accesses."""
        rnd = random.Random(seed)
        b = bytearray(rnd.randbytes(8 * n))
        bits = self.size.bit_length() - 1
        full, part = divmod(bits, 8)
        for pos in range(full + (1 if part else 0), 8):
            b[pos::8] = bytes(n)
        if part:
            table = bytes(i & ((1 << part) - 1) for i in range(256))
            b[full::8] = bytes(b[full::8]).translate(table)
        gpas = array("Q", bytes(b))
        accs = rnd.randbytes(n).translate(bytes(i & 1 for i in range(256)))   # read/write
        return gpas, accs

    def close(self):
        self.mem.close()


def bench_walks(p, log):
    from nptcore import CEngine, PyEngine
    if CEngine is None:
        return {"skipped": "C engine not built"}
    rows = []
    for size in p["walk_sizes"]:
        t = DenseTable(size)
        ceng = peng = None
        try:
            gpas, accs = t.random_gpas(p["walk_n"])
            out = array("Q", bytes(8 * len(gpas)))
            ceng = CEngine(t.mem.buf)
            peng = PyEngine(t.mem.buf)
            root = t.root
            n = len(gpas)
            k, miss = ceng.walk_batch(root, gpas, accs, out)     # warm (and check)
            assert k == n, (k, miss)
            check = array("Q", bytes(8 * n))
            ceng.floor_walk_batch(root, gpas, check)
            assert check == out, "floor walk disagrees with the walk"
            t_batch = _best(lambda: ceng.walk_batch(root, gpas, accs, out), 3) / n
            t_floor = _best(lambda: ceng.floor_walk_batch(root, gpas, out), 3) / n
            ns = p["walk_single"]
            walk = ceng.walk
            g1, a1 = gpas[:ns], accs[:ns]

            def single():
                for g, a in zip(g1, a1):
                    walk(root, g, a)
            t_single = _best(single, 2) / ns
            npy = p["walk_py"]
            gp, ap, op = gpas[:npy], accs[:npy], array("Q", bytes(8 * npy))
            t_py = _best(lambda: peng.walk_batch(root, gp, ap, op), 1) / npy
            assert op == out[:npy]
            ceng.close()
            peng.close()
        finally:
            ceng = peng = None     # drop the engines' exports before the mmap closes
            gc.collect()
            t.close()
        row = {"mapped": size, "table_pages": t.n_tables,
               "c_batch_ns": t_batch * 1e9, "c_single_ns": t_single * 1e9,
               "python_ns": t_py * 1e9, "floor_ns": t_floor * 1e9,
               "c_vs_python": t_py / t_batch, "c_vs_floor": t_batch / t_floor,
               "single_vs_batch": t_single / t_batch}
        log(f"walks {_fmt_size(size):>7}: batch {row['c_batch_ns']:.1f} ns, single "
            f"{row['c_single_ns']:.0f} ns, python {row['python_ns']:.0f} ns, floor "
            f"{row['floor_ns']:.1f} ns")
        rows.append(row)
    return {"rows": rows,
            "walk_c_vs_python": min(r["c_vs_python"] for r in rows),
            "walk_c_vs_floor": max(r["c_vs_floor"] for r in rows)}
