"""A sweep's results: one row per point in DIR/results.jsonl and DIR/results.csv.

Both files are written as points finish.  results.jsonl is the record (one
JSON object a line, appended and flushed row by row; ``--resume`` reads
it); results.csv holds the same rows for spreadsheets, appended row by row
too, and rewritten whole (to a temporary file, then renamed over it) only
when a row brings a column the header lacks.

A row: ``point`` (its name, what --resume matches), ``input``, ``command``,
the axis values under their option names, ``exit_code``, then every key of
the command's JSON report, then ``wall_s`` (the point's wall time on its
worker), ``host`` (the worker's host name) and, for a point that produced
no report, ``error``.
"""
import csv
import io
import json
import os

from ..errors import BadInput

__all__ = ["Results", "make_row", "row_failed", "JSONL", "CSV"]

JSONL, CSV = "results.jsonl", "results.csv"
_LEAD = ("point", "input", "command")
_TAIL = ("wall_s", "host", "error")


def make_row(point, result):
    """The row of ``point`` (spec.Point) from its ``result`` (worker.run_task)."""
    row = {"point": point.key, "input": point.input.label, "command": point.input.command}
    row.update(point.axes)
    row["exit_code"] = result.get("exit_code")    # the report's own is the same
    for k, v in (result.get("report") or {}).items():
        if k not in row:              # an axis's value is the one swept
            row[k] = v
    wall = result.get("wall_s")
    row["wall_s"] = round(wall, 6) if isinstance(wall, float) else wall
    row["host"] = result.get("host")
    if result.get("error"):
        row["error"] = result["error"]
    return row


def row_failed(row):
    """A point that produced no report of its own (bad input, a crash)."""
    return bool(row.get("error"))


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, separators=(",", ":"))
    return v


class Results:
    """The results files of one sweep in ``out_dir`` (created if missing).

    Without ``resume`` a results.jsonl with rows is refused (BadInput), never
    overwritten.  With it, its rows are read (``rows``: point name -> row);
    a last line cut short by a kill is dropped, and so are failed rows, whose
    points run again; the files are then rewritten from the rows kept.
    ``axes``: the axis names, for the CSV's column order."""

    def __init__(self, out_dir, resume=False, axes=()):
        self.dir = os.fspath(out_dir)
        self.jsonl_path = os.path.join(self.dir, JSONL)
        self.csv_path = os.path.join(self.dir, CSV)
        self.axes = list(axes)
        self.rows = {}
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise BadInput(f"--out {self.dir}: not a directory")
        exists = os.path.exists(self.jsonl_path)
        if exists and not resume and os.path.getsize(self.jsonl_path):
            raise BadInput(f"--out {self.dir} already holds a sweep's {JSONL}: --resume to "
                           "finish it, or choose another --out")
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise BadInput(f"--out {self.dir}: cannot create: {e.strerror or e}") from None
        if exists:
            self._read()
        self._columns = []
        try:
            self._rewrite_jsonl()
            self._rewrite_csv()
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        except OSError as e:
            raise BadInput(f"--out {self.dir}: cannot write: {e.strerror or e}") from None

    def _read(self):
        try:
            with open(self.jsonl_path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read {self.jsonl_path} (--resume): "
                           f"{getattr(e, 'strerror', None) or e}") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        elif lines:
            lines.pop()          # a row cut short by a kill: that point runs again
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise BadInput(f"{self.jsonl_path}:{n}: not a results row (JSON); "
                               "fix or remove that line to --resume") from None
            if not isinstance(row, dict) or not isinstance(row.get("point"), str):
                raise BadInput(f"{self.jsonl_path}:{n}: not a results row (no point name); "
                               "fix or remove that line to --resume")
            if row_failed(row):
                self.rows.pop(row["point"], None)
            else:
                self.rows[row["point"]] = row

    def _columns_for(self, rows):
        cols = list(self._columns)
        seen = set(cols)
        for row in rows:
            for k in row:
                if k not in seen:
                    seen.add(k)
                    cols.append(k)
        lead = [c for c in (*_LEAD, *self.axes, "exit_code") if c in seen]
        tail = [c for c in _TAIL if c in seen]
        mid = [c for c in cols if c not in lead and c not in tail]
        return lead + mid + tail

    @staticmethod
    def _atomic_write(path, text):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)

    def _rewrite_jsonl(self):
        if self.rows or os.path.exists(self.jsonl_path):
            self._atomic_write(self.jsonl_path, "".join(
                json.dumps(r) + "\n" for r in self.rows.values()))

    def _csv_text(self, rows, header):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._columns, restval="", lineterminator="\n")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})
        return buf.getvalue()

    def _rewrite_csv(self):
        self._columns = self._columns_for(self.rows.values())
        self._atomic_write(self.csv_path, self._csv_text(self.rows.values(), True)
                           if self._columns else "")

    def add(self, row):
        """Record one row in both files, now."""
        self.rows[row["point"]] = row
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if set(row) - set(self._columns):
            self._rewrite_csv()
        else:
            with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
                f.write(self._csv_text([row], False))

    def close(self):
        if not self._jsonl.closed:
            self._jsonl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
