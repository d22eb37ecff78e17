"""A vCPU's log of every nested page fault it took, in order.

It reads as a list of (gpa, access, errcode, rip) tuples (rip None where
the exit did not say), and is stored as four little-endian u64 words per NPF
in one array: about 32 bytes an NPF instead of a tuple and four ints (some
150), and the C fill hook's log of the NPFs it resolved itself (csrc/vcpu.h,
vcpu_ctx.log: the same four words) is appended with one copy
(extend_words), not a tuple built per NPF. A million NPFs are 32 MiB.

The access word's top bit says "rip unknown" (a real access kind is
nptcore.bits.ACC_R/W/X, a small number), so every 64-bit rip is kept as is.
"""
from array import array

NO_RIP = 1 << 63          # in the access word: the record has no rip
WORDS = 4                  # per NPF: gpa, access, errcode, rip


class NpfLog:
    __slots__ = ("_w",)

    def __init__(self, records=()):
        self._w = array("Q")
        self.extend(records)

    # -- adding --------------------------------------------------------------
    def append(self, record):
        gpa, access, err, rip = record
        if rip is None:
            self._w.extend((gpa, access | NO_RIP, err, 0))
        else:
            self._w.extend((gpa, access, err, rip))

    def extend(self, records):
        for r in records:
            self.append(r)

    def extend_words(self, words):
        """Append NPFs from an array('Q') of WORDS words each (gpa, access,
        errcode, rip), as csrc/vcpu.c's fast path writes them."""
        if words.typecode != "Q" or len(words) % WORDS:
            raise ValueError(f"an NPF log of {len(words)} {words.typecode!r} words is not "
                             f"whole records of {WORDS} u64")
        self._w.extend(words)

    def clear(self):
        del self._w[:]

    # -- reading ---------------------------------------------------------------
    def __len__(self):
        return len(self._w) // WORDS

    def __bool__(self):
        return len(self._w) > 0

    def _at(self, i):
        w = self._w
        k = WORDS * i
        access = w[k + 1]
        if access & NO_RIP:
            return (w[k], access & ~NO_RIP, w[k + 2], None)
        return (w[k], access, w[k + 2], w[k + 3])

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            return [self._at(j) for j in range(*i.indices(n))]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("NPF log index out of range")
        return self._at(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self._at(i)

    def gpas(self):
        """The faulting GPAs alone, in order (an array of u64)."""
        return self._w[0::WORDS]

    def __eq__(self, other):
        if isinstance(other, NpfLog):
            return self._w == other._w
        try:
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        except TypeError:
            return NotImplemented

    __hash__ = None

    def __add__(self, other):          # as a list: log + log is the list of both
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self):
        n = len(self)
        head = ", ".join(repr(r) for r in self[:3])
        return f"NpfLog({n} NPFs: [{head}{', ...' if n > 3 else ''}])"
