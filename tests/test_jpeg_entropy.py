"""The strict JPEG entropy-scan kernel (wsiengine.kernels.jpeg_entropy) against a plain-Python
reference decoder of the same scan, on JPEGs encoded with imagecodecs (qualities, 4:4:4, 4:2:0,
grayscale, restart intervals) and on the sample slide's tiles; and each kind of damage it finds.
"""

from __future__ import annotations

import io
from pathlib import Path

import imagecodecs
import numba
import numpy as np
import pytest

from wsiengine.backends.tile_checks import JpegTileCheck, _huffman_tables, _mcu_layout, _parse_jpeg
from wsiengine.kernels import jpeg_entropy as entropy


class _Bits:
    """A reference bit reader over entropy-coded bytes, one bit at a time (libjpeg's semantics)."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos, self.bits, self.marker, self.marker_pos = data, pos, [], None, None

    def _byte(self) -> None:
        if self.marker is not None:
            raise EOFError
        d, p = self.data, self.pos
        if p >= len(d):
            self.marker, self.marker_pos = -1, p
            raise EOFError
        if d[p] == 0xFF:
            q = p + 1
            while q < len(d) and d[q] == 0xFF:
                q += 1
            if q < len(d) and d[q] == 0:
                self.bits += [1] * 8
                self.pos = q + 1
                return
            self.marker, self.marker_pos = (d[q] if q < len(d) else -1), p
            raise EOFError
        self.bits += [(d[p] >> (7 - i)) & 1 for i in range(8)]
        self.pos = p + 1

    def get(self, n: int) -> int:
        while len(self.bits) < n:
            self._byte()
        value = 0
        for bit in self.bits[:n]:
            value = value * 2 + bit
        del self.bits[:n]
        return value

    def whole_bytes_to_marker(self) -> int:
        """Drop padding bits; count whole data bytes before the next marker."""
        left = len(self.bits) // 8
        self.bits = []
        while True:
            try:
                self._byte()
            except EOFError:
                return left
            left += 1
            self.bits = []


def _codes(payload: bytes) -> dict[int, dict[tuple[int, int], int]]:
    """Canonical Huffman codes of DHT payloads: slot -> {(length, code): value}."""
    out, pos = {}, 0
    while pos < len(payload):
        slot = (payload[pos] >> 4) * 4 + (payload[pos] & 15)
        counts = payload[pos + 1 : pos + 17]
        values = payload[pos + 17 : pos + 17 + sum(counts)]
        table, code, k = {}, 0, 0
        for length, n in enumerate(counts, 1):
            for _ in range(n):
                table[(length, code)] = values[k]
                code, k = code + 1, k + 1
            code <<= 1
        out[slot] = table
        pos += 17 + sum(counts)
    return out


def reference_scan(data: bytes, tables: bytes | None = None) -> tuple[int, int]:
    """(kernel code, number of Huffman symbols read) of a whole sequential JPEG, bit by bit."""
    head = _parse_jpeg(data, 1 << 16, 1 << 16)
    shared = _parse_jpeg(tables, 1 << 16, 1 << 16, tables_only=True) if tables else None
    codes = {}
    for payload in (shared.dht if shared else []) + head.dht:
        codes.update(_codes(payload))
    dc, ac, comp, limits, n_mcus = _mcu_layout(head, {**(shared.dc_quantisers if shared else {}), **head.dc_quantisers})
    interval = head.restart_interval or (shared.restart_interval if shared else None) or 0
    bits, pred, symbols, rst = _Bits(data, head.scan_start), [0] * len(head.scan), 0, 0

    def decode(slot: int) -> int:
        nonlocal symbols
        code = 0
        for length in range(1, 17):
            code = code * 2 + bits.get(1)
            if (length, code) in codes[slot]:
                symbols += 1
                return codes[slot][(length, code)]
        raise LookupError

    def extend(v: int, s: int) -> int:
        return v - (1 << s) + 1 if v < (1 << (s - 1)) else v

    try:
        for mcu in range(n_mcus):
            if interval and mcu and mcu % interval == 0:
                if bits.whole_bytes_to_marker():
                    return entropy.EXTRANEOUS_BYTES, symbols
                if bits.marker != 0xD0 + rst:
                    return entropy.BAD_RESTART, symbols
                rst, bits, pred = (rst + 1) % 8, _Bits(data, bits.marker_pos + 2), [0] * len(head.scan)
            for b in range(len(dc)):
                s = decode(int(dc[b]))
                if s > 11:
                    return entropy.DC_CATEGORY, symbols
                pred[comp[b]] += extend(bits.get(s), s) if s else 0
                if abs(pred[comp[b]]) > limits[comp[b]]:
                    return entropy.DC_RANGE, symbols
                k = 1
                while k < 64:
                    rs = decode(int(ac[b]))
                    r, s = rs >> 4, rs & 15
                    if s:
                        if s > 10:
                            return entropy.AC_SIZE, symbols
                        bits.get(s)
                        k += r + 1
                    elif r == 15:
                        k += 16
                    else:
                        break
                    if k > 64:
                        return entropy.AC_RUN_PAST_63, symbols
    except EOFError:
        return entropy.PREMATURE_END, symbols
    except LookupError:
        return entropy.BAD_HUFFMAN_CODE, symbols
    if bits.whole_bytes_to_marker():
        return entropy.EXTRANEOUS_BYTES, symbols
    return (entropy.SCAN_OK if bits.marker == 0xD9 else entropy.NOT_END), symbols


def kernel_scan(data: bytes, tables: bytes | None = None) -> tuple[int, int, int]:
    """(code, position, detail) of the kernel on a whole JPEG."""
    head = _parse_jpeg(data, 1 << 16, 1 << 16)
    shared = _parse_jpeg(tables, 1 << 16, 1 << 16, tables_only=True) if tables else None
    found = _huffman_tables((shared.dht if shared else []) + head.dht)
    dc, ac, comp, limits, n_mcus = _mcu_layout(head, {**(shared.dc_quantisers if shared else {}), **head.dc_quantisers})
    interval = head.restart_interval or (shared.restart_interval if shared else None) or 0
    code, at, detail = entropy.check_scan(np.frombuffer(data, np.uint8), head.scan_start, *entropy.stack_tables(found),
                                          dc, ac, comp, limits, n_mcus, interval)
    return int(code), int(at), int(detail)


def _image(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """A smooth image with noise: real codes of many lengths, long runs and short ones."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0)
    image = base[..., None] + rng.normal(0, 12, (height, width, channels))
    return np.clip(image, 0, 255).astype(np.uint8)


ENCODED = [
    pytest.param(dict(level=q, subsampling=sub), 3, id=f"q{q}-{name}")
    for q in (30, 75, 95, 100) for name, sub in (("444", (1, 1)), ("420", (2, 2)))
] + [pytest.param(dict(level=q), 1, id=f"q{q}-gray") for q in (50, 90)]


@pytest.mark.parametrize(("options", "channels"), ENCODED)
def test_kernel_equals_the_reference_on_encoded_jpegs(options, channels):
    image = _image(77, 101, channels).squeeze()  # sizes not multiples of the MCU
    data = imagecodecs.jpeg8_encode(image, **options)
    code, symbols = reference_scan(data)
    assert code == entropy.SCAN_OK and symbols > 500
    assert kernel_scan(data)[0] == entropy.SCAN_OK


@pytest.mark.parametrize("value", [0, 255])
@pytest.mark.parametrize("level", [100, 95, 50])
def test_extreme_dc_values_pass(value, level):
    """Black and white blocks have the largest DC a valid encoder writes (1024 / Q)."""
    data = imagecodecs.jpeg8_encode(np.full((48, 48, 3), value, np.uint8), level=level, subsampling=(1, 1))
    assert kernel_scan(data)[0] == reference_scan(data)[0] == entropy.SCAN_OK


def test_kernel_equals_the_reference_on_sample_slide_tiles(cmu_small):
    import tifffile

    with tifffile.TiffFile(cmu_small) as tif:
        page, fh = tif.pages[0], tif.filehandle
        for index in (0, 11, 57):
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
            assert reference_scan(data, page.jpegtables)[0] == entropy.SCAN_OK
            assert kernel_scan(data, page.jpegtables)[0] == entropy.SCAN_OK
            for seed in range(4):  # damaged the same way, both find the same kind of damage
                bad = _overwrite(data, seed)
                assert kernel_scan(bad, page.jpegtables)[0] == reference_scan(bad, page.jpegtables)[0] != entropy.SCAN_OK


def _overwrite(data: bytes, seed: int, size: int = 200) -> bytes:
    """``data`` with ``size`` random bytes without 0xFF (no marker) written in the middle of its scan."""
    rng = np.random.default_rng(seed)
    at = len(data) // 3 + int(rng.integers(0, len(data) // 3))
    noise = rng.integers(0, 255, size, dtype=np.uint8).tobytes()
    return data[:at] + noise + data[at + size :]


def _restart_jpeg() -> bytes:
    """A 4:2:0 JPEG with a restart marker after every 2 MCUs (Pillow's libjpeg; imagecodecs'
    jpeg8_encode has no restart-interval option)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(_image(64, 96, 3, seed=1)).save(out, "JPEG", quality=85, subsampling=2, restart_marker_blocks=2)
    return out.getvalue()


def test_restart_intervals_pass_and_are_walked():
    data = _restart_jpeg()
    assert data.count(b"\xff\xd0") >= 2 and b"\xff\xdd" in data
    assert reference_scan(data)[0] == entropy.SCAN_OK
    assert kernel_scan(data) == (entropy.SCAN_OK, len(data) - 2, 0)


def test_out_of_sequence_restart_marker_is_found():
    data = bytearray(_restart_jpeg())
    second = data.find(b"\xff\xd1")
    data[second + 1] = 0xD3  # RST3 where RST1 must be
    code, at, detail = kernel_scan(bytes(data))
    assert (code, at, detail) == (entropy.BAD_RESTART, second, 1 * 256 + 0xD3)
    message = JpegTileCheck(96, 64, None).why_damaged(bytes(data))
    assert message == (f"its image data is damaged at byte {second:,} of {len(data):,}: "
                       "restart marker RST3 where RST1 must be (libjpeg would warn and resynchronise)")


def test_bytes_left_before_a_restart_marker_are_extraneous():
    data = _restart_jpeg()
    at = data.find(b"\xff\xd0")
    code, _, detail = kernel_scan(data[:at] + b"\x12\x34" + data[at:])
    assert (code, detail) == (entropy.EXTRANEOUS_BYTES, 2)


def test_missing_restart_marker_is_found():
    data = _restart_jpeg()
    at = data.find(b"\xff\xd0")
    assert kernel_scan(data[:at] + data[at + 2 :])[0] in (entropy.EXTRANEOUS_BYTES, entropy.BAD_HUFFMAN_CODE,
                                                          entropy.BAD_RESTART, entropy.PREMATURE_END)


def test_scan_cut_short_is_a_premature_end():
    data = imagecodecs.jpeg8_encode(_image(64, 64, 3), level=90)
    code, at, detail = kernel_scan(data[: len(data) * 2 // 3] + b"\xff\xd9")
    assert (code, detail) == (entropy.PREMATURE_END, 0xD9)
    assert at == len(data) * 2 // 3


def test_marker_free_noise_and_zero_runs_are_found_as_the_reference_finds_them():
    found = 0
    for seed in range(8):
        data = imagecodecs.jpeg8_encode(_image(120, 120, 3, seed), level=80)
        for bad in (_overwrite(data, seed), data[: len(data) // 2] + bytes(150) + data[len(data) // 2 + 150 :]):
            code = kernel_scan(bad)[0]
            assert code == reference_scan(bad)[0]
            found += code != entropy.SCAN_OK
    # Damage that decodes to as many blocks as it replaced, with sane values, is invisible (to
    # libjpeg too): rare on real tiles (see test_hostile_slides), one of these 16 cases.
    assert found >= 14


def test_values_no_encoder_writes_are_found():
    # One 8x8 grayscale block, hand-made tables: DC category 0..11 and 12; AC (run, size) symbols.
    dc_values = list(range(13))
    ac_values = [0x00, 0xF0, 0x01, 0x0B, 0xE1]  # EOB, ZRL, (0,1), (0,11), (14,1)
    dht = bytes([0x00]) + bytes([0, 0, 0, 13] + [0] * 12) + bytes(dc_values) + bytes([0x10]) + bytes([0, 0, 5] + [0] * 13) + bytes(ac_values)
    sos = bytes([1, 1, 0x00, 0, 63, 0])

    def jpeg(bits: str, width: int = 8) -> bytes:
        sof = bytes([8, 0, 8, 0, width, 1, 1, 0x11, 0])
        bits += "1" * (-len(bits) % 8)
        scan = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
        segment = lambda m, p: b"\xff" + bytes([m]) + (len(p) + 2).to_bytes(2, "big") + p  # noqa: E731
        return b"\xff\xd8" + segment(0xC4, dht) + segment(0xC0, sof) + segment(0xDA, sos) + scan + b"\xff\xd9"

    dc_code = {s: format(s, "04b") for s in dc_values}  # 13 codes of 4 bits: 0000..1100
    ac_code = {v: format(i, "03b") for i, v in enumerate(ac_values)}  # 3-bit codes 000..100
    assert kernel_scan(jpeg(dc_code[0] + ac_code[0x00]))[0] == entropy.SCAN_OK
    assert kernel_scan(jpeg(dc_code[12] + "0" * 12 + ac_code[0x00]))[0] == entropy.DC_CATEGORY
    assert kernel_scan(jpeg(dc_code[0] + ac_code[0x0B] + "1" * 11 + ac_code[0x00]))[0] == entropy.AC_SIZE
    assert kernel_scan(jpeg(dc_code[0] + (ac_code[0xE1] + "1") * 5 + ac_code[0x00]))[0] == entropy.AC_RUN_PAST_63
    assert kernel_scan(jpeg(dc_code[0] + ac_code[0xF0] * 4 + ac_code[0x00]))[0] == entropy.AC_RUN_PAST_63
    assert kernel_scan(jpeg(dc_code[0] + ac_code[0xF0] * 3 + ac_code[0x00]))[0] == entropy.SCAN_OK
    assert kernel_scan(jpeg(dc_code[0] + "111" + "0" * 16))[0] == entropy.BAD_HUFFMAN_CODE
    big = dc_code[11] + "1" * 11 + ac_code[0x00]  # a DC difference of +2047
    assert kernel_scan(jpeg(big))[0] == reference_scan(jpeg(big))[0] == entropy.SCAN_OK
    assert kernel_scan(jpeg(big * 2, width=16))[0] == reference_scan(jpeg(big * 2, width=16))[0] == entropy.DC_RANGE


def test_extraneous_bytes_after_the_last_block():
    data = imagecodecs.jpeg8_encode(_image(32, 32, 3), level=90)
    code, at, detail = kernel_scan(data[:-2] + b"\x00\x01\x02" + data[-2:])
    assert (code, detail, at) == (entropy.EXTRANEOUS_BYTES, 3, len(data) + 1)


def test_invalid_huffman_tables_are_refused():
    with pytest.raises(ValueError, match="too many codes"):
        entropy.huffman_table(np.array([2] + [0] * 15), np.arange(2))  # codes 0 and 1 of 1 bit: all-ones used


# The kernel as it was before its fast pass (commit eb8c4a6), frozen: check_scan must give the
# very same (code, position, detail) on every scan, damaged or not.

def _previous_tables(found: dict[int, entropy.HuffmanTable]) -> tuple[np.ndarray, ...]:
    """The previous kernel's stacked (lookahead, maxcode, valoffset, values, ac_fast): a 9-bit
    look-up of codes, and of AC codes with their magnitude bits."""
    bits = 9
    ac_fast = np.zeros((8, 1 << bits), np.int32)
    for slot, (lookahead, *_) in found.items():
        for index, look in enumerate(lookahead):
            length, rs = int(look) >> 8, int(look) & 0xFF
            run, size = rs >> 4, rs & 15
            if look and length + size <= bits and size <= 10:
                ac_fast[slot, index] = ((length + size) << 8) | (run + 1 if size else (16 if run == 15 else 255))
    return (*entropy.stack_tables(found)[:4], ac_fast)


@numba.njit(nogil=True)
def _previous_decode(buf, nbits, slot, lookahead, maxcode, valoffset, values):
    look = lookahead[slot, (buf >> (nbits - 9)) & 511]
    if look != 0:
        return look & 0xFF, look >> 8
    for length in range(10, 17):
        code = (buf >> (nbits - length)) & ((1 << length) - 1)
        if code <= maxcode[slot, length]:
            return np.int64(values[slot, valoffset[slot, length] + code]), length
    return -1, 0


@numba.njit(nogil=True)
def _previous_check_scan(data, start, lookahead, maxcode, valoffset, values, ac_fast, dc_slot, ac_slot, component,
                         dc_limit, n_mcus, restart_interval):
    fill, decode = entropy._fill, _previous_decode
    end = data.shape[0]
    pred = np.zeros(dc_limit.shape[0], np.int64)
    pos, buf, nbits, pad, marker, marker_pos = start, np.int64(0), np.int64(0), np.int64(0), np.int64(0), end
    next_rst = 0
    for mcu in range(n_mcus):
        if restart_interval > 0 and mcu > 0 and mcu % restart_interval == 0:
            left = (nbits - pad) // 8
            while marker == 0:
                pos, buf, nbits, pad, marker, marker_pos = fill(data, pos, end, buf, np.int64(0), pad, marker, marker_pos)
                left += (nbits - pad) // 8
            if left > 0:
                return entropy.EXTRANEOUS_BYTES, marker_pos, left
            if marker != 0xD0 + next_rst:
                return entropy.BAD_RESTART, marker_pos, next_rst * 256 + marker
            next_rst = (next_rst + 1) & 7
            pos, buf, nbits, pad, marker, marker_pos = marker_pos + 2, np.int64(0), np.int64(0), np.int64(0), np.int64(0), end
            pred[:] = 0
        for b in range(dc_slot.shape[0]):
            if nbits < 32:
                pos, buf, nbits, pad, marker, marker_pos = fill(data, pos, end, buf, nbits, pad, marker, marker_pos)
            s, length = decode(buf, nbits, dc_slot[b], lookahead, maxcode, valoffset, values)
            at = pos - (nbits - pad) // 8
            if length == 0:
                return (entropy.PREMATURE_END, marker_pos, marker) if nbits - pad < 16 else (entropy.BAD_HUFFMAN_CODE, at, dc_slot[b])
            if s > 11:
                return entropy.DC_CATEGORY, at, s
            if length + s > nbits - pad:
                return entropy.PREMATURE_END, marker_pos, marker
            nbits -= length
            diff = 0
            if s > 0:
                diff = entropy._extend((buf >> (nbits - s)) & ((1 << s) - 1), s)
                nbits -= s
            c = component[b]
            pred[c] += diff
            if abs(pred[c]) > dc_limit[c]:
                return entropy.DC_RANGE, at, pred[c]
            k = 1
            slot = ac_slot[b]
            while k < 64:
                if nbits < 32:
                    pos, buf, nbits, pad, marker, marker_pos = fill(data, pos, end, buf, nbits, pad, marker, marker_pos)
                fast = ac_fast[slot, (buf >> (nbits - 9)) & 511]
                if fast != 0 and (fast >> 8) <= nbits - pad:
                    nbits -= fast >> 8
                    advance = fast & 0xFF
                    if advance == 255:
                        break
                    k += advance
                    if k > 64:
                        return entropy.AC_RUN_PAST_63, pos - (nbits - pad) // 8, k - 1
                    continue
                rs, length = decode(buf, nbits, slot, lookahead, maxcode, valoffset, values)
                at = pos - (nbits - pad) // 8
                if length == 0:
                    return (entropy.PREMATURE_END, marker_pos, marker) if nbits - pad < 16 else (entropy.BAD_HUFFMAN_CODE, at, slot)
                r, s = rs >> 4, rs & 15
                if length + s > nbits - pad:
                    return entropy.PREMATURE_END, marker_pos, marker
                nbits -= length + s
                if s > 0:
                    if s > 10:
                        return entropy.AC_SIZE, at, s
                    k += r
                    if k > 63:
                        return entropy.AC_RUN_PAST_63, at, k
                    k += 1
                elif r == 15:
                    k += 16
                    if k > 64:
                        return entropy.AC_RUN_PAST_63, at, k - 1
                else:
                    break
    left = (nbits - pad) // 8
    while marker == 0:
        pos, buf, nbits, pad, marker, marker_pos = fill(data, pos, end, buf, np.int64(0), pad, marker, marker_pos)
        left += (nbits - pad) // 8
    if left > 0:
        return entropy.EXTRANEOUS_BYTES, marker_pos, left
    if marker != 0xD9:
        return entropy.NOT_END, marker_pos, marker
    return entropy.SCAN_OK, marker_pos, 0


def _both_kernels(data: bytes, tables: bytes | None) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """(check_scan, the previous kernel) on a whole JPEG, or None if its headers are not a sequential scan's."""
    head = _parse_jpeg(data, 1 << 16, 1 << 16)
    shared = _parse_jpeg(tables, 1 << 16, 1 << 16, tables_only=True) if tables else None
    if isinstance(head, str) or isinstance(shared, str):
        return None
    found = _huffman_tables((shared.dht if shared else []) + head.dht)
    layout = _mcu_layout(head, {**(shared.dc_quantisers if shared else {}), **head.dc_quantisers})
    if isinstance(found, str) or layout is None or isinstance(layout, str):
        return None
    dc, ac, comp, limits, n_mcus = layout
    if not set(dc.tolist()) | set(ac.tolist()) <= found.keys():
        return None
    interval = head.restart_interval or (shared.restart_interval if shared else None) or 0
    array = np.frombuffer(data, np.uint8)
    now = entropy.check_scan(array, head.scan_start, *entropy.stack_tables(found), dc, ac, comp, limits, n_mcus, interval)
    before = _previous_check_scan(array, head.scan_start, *_previous_tables(found), dc, ac, comp, limits, n_mcus, interval)
    return tuple(map(int, now)), tuple(map(int, before))


def _damaged_copies(data: bytes, rng: np.random.Generator) -> list[bytes]:
    """Copies of a JPEG with its scan damaged: random bytes, a zero run, bit flips, a cut, an 0xFF."""
    copies, n = [], len(data)
    at, size = int(rng.integers(n // 10, n - 2)), int(rng.integers(1, 400))
    copies.append(data[:at] + rng.integers(0, 256, size, dtype=np.uint8).tobytes() + data[at + size :])
    at, size = int(rng.integers(n // 10, n - 2)), int(rng.integers(1, 400))
    copies.append(data[:at] + bytes(size) + data[at + size :])
    flipped = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        flipped[int(rng.integers(n // 10, n - 2))] ^= 1 << int(rng.integers(0, 8))
    copies.append(bytes(flipped))
    at = int(rng.integers(n // 10, n - 2))
    copies.append(data[:at] + data[at + int(rng.integers(1, 64)) :])
    copies.append(data[:at] + b"\xff" + data[at + 1 :])
    return copies


def _tiles(path, count: int) -> tuple[list[bytes], bytes | None]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page, fh = tif.pages[0], tif.filehandle
        picked = np.linspace(0, len(page.dataoffsets) - 1, min(count, len(page.dataoffsets))).astype(int)
        tiles = []
        for index in picked:
            fh.seek(page.dataoffsets[index])
            tiles.append(fh.read(page.databytecounts[index]))
        return tiles, page.jpegtables


MOSAIC = Path("/tmp/bench14/cases/pcam-mosaic-30720.tiff")


def _slides(cmu_small) -> list:
    return [cmu_small] + ([MOSAIC] if MOSAIC.exists() else [])


def test_check_scan_equals_the_previous_kernel_on_slide_tiles_and_damaged_copies(cmu_small):
    """Every verdict, position and detail as before, on 200 tiles of each slide (the sample slide;
    the PCam mosaic of benchmarks/bench_tiling.py, real tissue at q90, when it has been written)
    and on five damaged copies of each."""
    rng = np.random.default_rng(14)
    kinds = set()
    for path in _slides(cmu_small):
        tiles, tables = _tiles(path, 200)
        for data in tiles:
            now, before = _both_kernels(data, tables)
            assert now == before and now[0] == entropy.SCAN_OK
            for bad in _damaged_copies(data, rng):
                found = _both_kernels(bad, tables)
                if found is not None:
                    assert found[0] == found[1], (path.name, found)
                    kinds.add(found[0][0])
    assert {entropy.SCAN_OK, entropy.BAD_HUFFMAN_CODE, entropy.PREMATURE_END, entropy.DC_RANGE} <= kinds


def test_check_scan_equals_the_reference_on_mosaic_tiles(cmu_small):
    """The bit-by-bit reference on a few tiles and damaged copies (it takes 0.1 s a tile)."""
    rng = np.random.default_rng(3)
    for path in _slides(cmu_small):
        tiles, tables = _tiles(path, 6)
        for data in tiles:
            for bad in [data] + _damaged_copies(data, rng)[:3]:
                found = _both_kernels(bad, tables)
                if found is not None:
                    assert found[0][0] == reference_scan(bad, tables)[0]


def test_encoded_jpegs_and_their_damaged_copies_equal_the_previous_kernel():
    """4:4:4, 4:2:0, grayscale, qualities 30..100 and restart intervals, damaged many ways."""
    rng = np.random.default_rng(7)
    images = [imagecodecs.jpeg8_encode(_image(77, 101, 3, seed), level=level, subsampling=sub)
              for seed, level, sub in ((0, 30, (2, 2)), (1, 75, (1, 1)), (2, 95, (2, 2)), (3, 100, (1, 1)))]
    images += [imagecodecs.jpeg8_encode(_image(77, 101, 1, 4).squeeze(), level=90), _restart_jpeg()]
    for data in images:
        now, before = _both_kernels(data, None)
        assert now == before and now[0] == entropy.SCAN_OK
        for _ in range(40):
            for bad in _damaged_copies(data, rng):
                found = _both_kernels(bad, None)
                if found is not None:
                    assert found[0] == found[1]
