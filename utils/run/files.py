"""Writing files so that a reader never sees half of one: write a temporary file beside the target, flush it to
disk, then rename it over the target (a rename within one directory is atomic on POSIX). A process killed
mid-write leaves the previous file intact and at most a `*.tmp.<pid>` file beside it."""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """`with atomic_write(path, "wb") as handle: ...`: the file appears at `path` complete or not at all."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, data):
    """`data` as indented JSON with sorted keys, written atomically (non-JSON values as their `str`)."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def write_text(path: str, text: str):
    with atomic_write(path) as handle:
        handle.write(text)


def read_json(path: str):
    """The JSON file at `path`, or None where it is missing or not JSON (a run's finished.json, a card)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
