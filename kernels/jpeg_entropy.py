"""A strict pass over a sequential Huffman JPEG scan: the checks libjpeg makes, without the IDCT.

:func:`check_scan` walks the entropy-coded data of one baseline / extended sequential scan
(SOF0 / SOF1, 8-bit, Huffman) MCU by MCU, block by block, exactly as libjpeg's ``jdhuff.c``
reads it, and stops at the first problem libjpeg would warn about ("Corrupt JPEG data: ..."):

- a bit pattern that is no Huffman code (:data:`BAD_HUFFMAN_CODE`);
- the scan needing bits past the end of its data or past a marker (:data:`PREMATURE_END`);
- whole bytes left over after the last MCU of the image or of a restart interval
  (:data:`EXTRANEOUS_BYTES`; fewer than 8 padding bits are fine);
- a restart interval not followed by the next restart marker RST0..RST7 in sequence
  (:data:`BAD_RESTART`), or the image followed by a marker other than EOI (:data:`NOT_END`);

and at things no valid 8-bit encoder writes, which libjpeg decodes without a word: an AC run
past coefficient 63 (:data:`AC_RUN_PAST_63`), a DC category above 11 (:data:`DC_CATEGORY`), an AC
size above 10 (:data:`AC_SIZE`), a DC value (prediction + difference) larger in magnitude than
the caller's limit for its component (:data:`DC_RANGE`): the DC of an 8x8 block of 8-bit samples
is at most 1024 before quantisation, so at most ``1024 // Q + 1`` after it, Q being the
component's DC quantiser (2047 without a table). Damage that drifts the DC predictor is caught
by this long after the damaged bytes.

Byte stuffing: 0xFF 0x00 is the data byte 0xFF, and 0xFF fill bytes before either are skipped,
as libjpeg does. Progressive, arithmetic-coded, lossless, 12-bit and multi-scan sequential
images are not this kernel's business: the caller checks their markers only.

Tables are built once in plain numpy by :func:`huffman_table` and stacked by
:func:`stack_tables` into 8 slots (DC tables 0..3, AC tables 4..7). The kernel is
``numba.njit(cache=True, nogil=True)`` and single-threaded, like every kernel of this package.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "SCAN_OK", "BAD_HUFFMAN_CODE", "PREMATURE_END", "EXTRANEOUS_BYTES", "BAD_RESTART", "NOT_END",
    "AC_RUN_PAST_63", "DC_CATEGORY", "AC_SIZE", "DC_RANGE",
    "LOOKAHEAD_BITS", "HuffmanTable", "huffman_table", "stack_tables", "check_scan",
]

SCAN_OK = 0
#: no Huffman code matches the next 16 bits; detail: the table slot
BAD_HUFFMAN_CODE = 1
#: the scan needs bits past a marker or the end of the data; detail: the marker (-1: end of data)
PREMATURE_END = 2
#: whole bytes left before the marker after an interval or the image; detail: how many
EXTRANEOUS_BYTES = 3
#: a restart interval ends at a marker other than the expected RSTm; detail: expected * 256 + found
BAD_RESTART = 4
#: the last MCU is followed by a marker other than EOI; detail: the marker
NOT_END = 5
#: an AC run (or ZRL) goes past coefficient 63; detail: the coefficient index it reaches
AC_RUN_PAST_63 = 6
#: a DC difference category above 11; detail: the category
DC_CATEGORY = 7
#: an AC coefficient size above 10; detail: the size
AC_SIZE = 8
#: a DC value beyond the component's limit; detail: the value
DC_RANGE = 9

#: codes of up to this many bits are decoded with one table look-up
LOOKAHEAD_BITS = 9

#: (lookahead, maxcode, valoffset, values, ac_fast): the arrays of one table (see :func:`huffman_table`)
HuffmanTable = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def huffman_table(counts: np.ndarray, values: np.ndarray) -> HuffmanTable:
    """The decoding arrays of one DHT table (``counts[l-1]`` codes of ``l`` bits, l = 1..16).

    Returns ``lookahead`` (``(2**LOOKAHEAD_BITS,)`` int32: ``length << 8 | value`` of the code the
    next LOOKAHEAD_BITS bits start with, 0 if longer or none), ``maxcode`` (``(18,)`` int64, the
    largest code of each length, -1 if none), ``valoffset`` (``(18,)`` int64) and ``values``
    (``(256,)`` uint8), as libjpeg's ``jpeg_make_d_derived_tbl``, and ``ac_fast``
    (``(2**LOOKAHEAD_BITS,)`` int32, for AC tables: ``(length + size) << 8 | coefficients
    advanced`` when a code and its size <= 10 magnitude bits fit in the lookahead, the advance
    being run + 1, 16 for ZRL, 255 for EOB; else 0). Raises ValueError when the counts are
    impossible (more than 256 values, or more codes of a length than its bits allow).
    """
    counts = np.asarray(counts, np.int64)
    if counts.shape != (16,) or counts.sum() > 256 or counts.sum() > len(values):
        raise ValueError("bad Huffman table counts")
    lookahead = np.zeros(1 << LOOKAHEAD_BITS, np.int32)
    maxcode = np.full(18, -1, np.int64)
    valoffset = np.zeros(18, np.int64)
    table_values = np.zeros(256, np.uint8)
    table_values[: counts.sum()] = np.asarray(values[: counts.sum()], np.uint8)
    ac_fast = np.zeros(1 << LOOKAHEAD_BITS, np.int32)
    code, k = 0, 0
    for length in range(1, 17):
        n = int(counts[length - 1])
        if n:
            if code + n > (1 << length) - 1:  # codes must fit in ``length`` bits, all-ones excluded (as libjpeg)
                raise ValueError("bad Huffman table: too many codes")
            valoffset[length] = k - code
            maxcode[length] = code + n - 1
            if length <= LOOKAHEAD_BITS:
                shift = LOOKAHEAD_BITS - length
                for i in range(n):
                    start = (code + i) << shift
                    rs = int(table_values[k + i])
                    lookahead[start : start + (1 << shift)] = (length << 8) | rs
                    run, size = rs >> 4, rs & 15
                    advance = run + 1 if size else (16 if run == 15 else 255)
                    if length + size <= LOOKAHEAD_BITS and size <= 10:
                        ac_fast[start : start + (1 << shift)] = ((length + size) << 8) | advance
        code, k = (code + n) << 1, k + n
    return lookahead, maxcode, valoffset, table_values, ac_fast


def stack_tables(tables: dict[int, HuffmanTable]) -> HuffmanTable:
    """Stack the tables of slots 0..7 (DC 0..3, AC 4..7) into the kernel's ``(8, ...)`` arrays; absent slots are empty."""
    lookahead = np.zeros(1 << LOOKAHEAD_BITS, np.int32)
    empty = (lookahead, np.full(18, -1, np.int64), np.zeros(18, np.int64), np.zeros(256, np.uint8), lookahead)
    rows = [tables.get(slot, empty) for slot in range(8)]
    return tuple(np.stack([row[i] for row in rows]) for i in range(5))  # type: ignore[return-value]


@numba.njit(cache=True, nogil=True)
def _fill(data, pos, end, buf, nbits, pad, marker, marker_pos):
    """Top the bit buffer up to at least 49 bits; zero bits (``pad``) once a marker or the end is reached."""
    while nbits <= 48:
        if marker != 0:
            buf = (buf << 8) & 0xFFFFFFFFFFFFFF
            nbits += 8
            pad += 8
            continue
        if pos >= end:
            marker, marker_pos = -1, end
            continue
        c = np.int64(data[pos])
        if c == 0xFF:
            q = pos + 1
            while q < end and data[q] == 0xFF:  # fill bytes
                q += 1
            if q >= end:
                marker, marker_pos = -1, end
                continue
            if data[q] != 0:
                marker, marker_pos = np.int64(data[q]), q - 1
                continue
            pos = q + 1
        else:
            pos += 1
        buf = ((buf << 8) | c) & 0xFFFFFFFFFFFFFF
        nbits += 8
    return pos, buf, nbits, pad, marker, marker_pos


@numba.njit(cache=True, nogil=True)
def _decode(buf, nbits, slot, lookahead, maxcode, valoffset, values):
    """(value, code length) of the Huffman code at the top of the buffer, or (-1, 0) if none matches."""
    look = lookahead[slot, (buf >> (nbits - LOOKAHEAD_BITS)) & ((1 << LOOKAHEAD_BITS) - 1)]
    if look != 0:
        return look & 0xFF, look >> 8
    for length in range(LOOKAHEAD_BITS + 1, 17):
        code = (buf >> (nbits - length)) & ((1 << length) - 1)
        if code <= maxcode[slot, length]:
            return np.int64(values[slot, valoffset[slot, length] + code]), length
    return -1, 0


@numba.njit(cache=True, nogil=True)
def _extend(bits, size):
    """The signed value of ``size`` magnitude bits (JPEG's EXTEND)."""
    if bits < (1 << (size - 1)):
        return bits - (1 << size) + 1
    return bits


@numba.njit(cache=True, nogil=True)
def check_scan(data, start, lookahead, maxcode, valoffset, values, ac_fast, dc_slot, ac_slot, component, dc_limit,
               n_mcus, restart_interval):
    """Walk a sequential Huffman scan; return ``(code, byte position, detail)``, code :data:`SCAN_OK` if sound.

    ``data`` is the whole JPEG (uint8), ``start`` the byte after the SOS header. Blocks of one MCU
    are listed in order by ``dc_slot``, ``ac_slot`` (table slots, see :func:`stack_tables`) and
    ``component`` (their scan component, for the DC prediction); ``dc_limit`` is the largest
    DC magnitude of each scan component;
    ``restart_interval`` is in MCUs (0: none). The position is that of the byte holding the
    offending bits (approximate by a few bytes inside the bit buffer).
    """
    end = data.shape[0]
    pred = np.zeros(dc_limit.shape[0], np.int64)
    pos, buf, nbits, pad, marker, marker_pos = start, np.int64(0), np.int64(0), np.int64(0), np.int64(0), end
    blocks = dc_slot.shape[0]
    next_rst = 0
    for mcu in range(n_mcus):
        if restart_interval > 0 and mcu > 0 and mcu % restart_interval == 0:
            left = (nbits - pad) // 8  # whole unread bytes: libjpeg discards them and counts them
            while marker == 0:
                pos, buf, nbits, pad, marker, marker_pos = _fill(data, pos, end, buf, np.int64(0), pad, marker, marker_pos)
                left += (nbits - pad) // 8
            if left > 0:
                return EXTRANEOUS_BYTES, marker_pos, left
            if marker != 0xD0 + next_rst:
                return BAD_RESTART, marker_pos, next_rst * 256 + marker
            next_rst = (next_rst + 1) & 7
            pos, buf, nbits, pad, marker, marker_pos = marker_pos + 2, np.int64(0), np.int64(0), np.int64(0), np.int64(0), end
            pred[:] = 0
        for b in range(blocks):
            # DC: category, then that many bits of difference
            if nbits < 32:
                pos, buf, nbits, pad, marker, marker_pos = _fill(data, pos, end, buf, nbits, pad, marker, marker_pos)
            s, length = _decode(buf, nbits, dc_slot[b], lookahead, maxcode, valoffset, values)
            at = pos - (nbits - pad) // 8
            if length == 0:
                return (PREMATURE_END, marker_pos, marker) if nbits - pad < 16 else (BAD_HUFFMAN_CODE, at, dc_slot[b])
            if s > 11:
                return DC_CATEGORY, at, s
            if length + s > nbits - pad:
                return PREMATURE_END, marker_pos, marker
            nbits -= length
            diff = 0
            if s > 0:
                diff = _extend((buf >> (nbits - s)) & ((1 << s) - 1), s)
                nbits -= s
            c = component[b]
            pred[c] += diff
            if abs(pred[c]) > dc_limit[c]:
                return DC_RANGE, at, pred[c]
            # AC: (run, size) codes up to EOB or coefficient 63
            k = 1
            slot = ac_slot[b]
            while k < 64:
                if nbits < 32:
                    pos, buf, nbits, pad, marker, marker_pos = _fill(data, pos, end, buf, nbits, pad, marker, marker_pos)
                fast = ac_fast[slot, (buf >> (nbits - LOOKAHEAD_BITS)) & ((1 << LOOKAHEAD_BITS) - 1)]
                if fast != 0 and (fast >> 8) <= nbits - pad:  # a common code and its bits in one look-up
                    nbits -= fast >> 8
                    advance = fast & 0xFF
                    if advance == 255:  # EOB
                        break
                    k += advance
                    if k > 64:
                        return AC_RUN_PAST_63, pos - (nbits - pad) // 8, k - 1
                    continue
                rs, length = _decode(buf, nbits, slot, lookahead, maxcode, valoffset, values)
                at = pos - (nbits - pad) // 8
                if length == 0:
                    return (PREMATURE_END, marker_pos, marker) if nbits - pad < 16 else (BAD_HUFFMAN_CODE, at, slot)
                r, s = rs >> 4, rs & 15
                if length + s > nbits - pad:
                    return PREMATURE_END, marker_pos, marker
                nbits -= length + s
                if s > 0:
                    if s > 10:
                        return AC_SIZE, at, s
                    k += r
                    if k > 63:
                        return AC_RUN_PAST_63, at, k
                    k += 1
                elif r == 15:  # ZRL: sixteen zeros
                    k += 16
                    if k > 64:
                        return AC_RUN_PAST_63, at, k - 1
                else:  # EOB
                    break
    left = (nbits - pad) // 8
    while marker == 0:
        pos, buf, nbits, pad, marker, marker_pos = _fill(data, pos, end, buf, np.int64(0), pad, marker, marker_pos)
        left += (nbits - pad) // 8
    if left > 0:
        return EXTRANEOUS_BYTES, marker_pos, left
    if marker != 0xD9:
        return NOT_END, marker_pos, marker
    return SCAN_OK, marker_pos, 0
