"""the load's checks, piece by piece: the sidecar's table checksums (numpy against the engine's C++), the GGUF
directory (a parse against a kept one), and the converted GGUF's check (cold, then warm)

    python load_parts.py MODEL.neuralink.gguf
"""
import sys, time
import numpy as np
from neuralink import _engine
from neuralink.formats import gguf_directory as gd
from neuralink.formats.checksum import block_checksum, checksum
from neuralink.formats.sidecar_records import is_table_tensor
from neuralink.formats.sidecar_writer import sidecar_checksums

model = sys.argv[1]
sidecar = model.replace(".gguf", ".sidecar")


def numpy_checksums(path):
    d = gd.read_gguf_directory(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    head = block_checksum(data[: d.data_offset])
    tables = [block_checksum(data[t.offset: t.offset + t.nbytes]) for n, t in d.tensors.items() if is_table_tensor(n)]
    return head, checksum(np.asarray(tables, dtype="<u8").tobytes())


gd.read_gguf_directory(model)
for _ in range(2):
    t = time.perf_counter(); a = numpy_checksums(sidecar); t1 = time.perf_counter() - t
    t = time.perf_counter(); b = sidecar_checksums(sidecar); t2 = time.perf_counter() - t
    assert a == b
    t = time.perf_counter(); gd._read_directory.__wrapped__(gd.Path(model), ()); t3 = time.perf_counter() - t
    t = time.perf_counter(); gd.read_gguf_directory(model); t4 = time.perf_counter() - t
    print(f"sidecar tables: numpy {t1:.3f} s, C++ {t2:.3f} s; GGUF directory: parse {t3:.3f} s, kept {t4 * 1e3:.2f} ms")
for cold in (True, False, True):
    if cold:
        _engine.evict_from_page_cache(model)
    t = time.perf_counter(); n = _engine.verify_model_file(model, sidecar); dt = time.perf_counter() - t
    print("model check", "cold" if cold else "warm", f"{dt:.2f} s, {n / 2**20:.0f} MiB")
