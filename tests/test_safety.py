"""No code from data: temp names unique across nodes, reduce partials that are data only, checkpoints that
load without running anything."""
import socket

from pipeline.store import temp_path, write_bytes_atomic


def test_temp_names_differ_between_writers_and_name_the_host(tmp_path):
    """Two writers of one file (on two nodes, their pids may be equal) never share a temp name, and a
    commit leaves only the file."""
    dest = tmp_path / "part-00000.parquet"
    a, b = temp_path(dest), temp_path(dest)
    assert a != b and a.parent == dest.parent
    assert a.name.startswith(".part-00000.parquet.tmp-") and socket.gethostname() in a.name
    write_bytes_atomic(b"x", dest)
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]
