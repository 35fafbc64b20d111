"""Checks of a TIFF pyramid's stored JPEG and JPEG 2000 tiles before they are decoded.

A checker is made once per level (:func:`tile_check`; it parses the level's JPEGTables once)
and answers :meth:`why_damaged` for the raw bytes of each of its tiles: None for a sound tile,
else what is wrong, for a :class:`~wsiengine.errors.SlideReadError` naming the tile
(:meth:`StoredTiles.damaged`). :class:`StoredTiles` reads a level's stored tiles (``os.pread``)
and checks them, for the tifffile backend (before decoding) and the tiffslide backend (before
tiffslide reads a region, each tile once).

JPEG (:class:`JpegTileCheck`): the markers (:func:`check_jpeg_tile`), then, for a sequential
Huffman 8-bit tile whose single scan holds every component, a strict pass over the
entropy-coded data (:func:`wsiengine.kernels.jpeg_entropy.check_scan`): every Huffman code,
restart marker and padding byte as libjpeg reads them, plus values no valid encoder writes.
Progressive, arithmetic-coded, lossless, 12-bit and multi-scan tiles, and tiles whose Huffman
tables are defined nowhere (libjpeg would use its defaults), get the marker checks only.

JPEG 2000 (:class:`Jpeg2kTileCheck`): there is no checksum, and OpenJPEG decodes damaged
code-block data silently. Checked is what the standard's structure allows: the main header's
marker segments (SOC, SIZ first, COD and QCD present, only main-header markers), each tile-part
(SOT with a tile index inside the image and a length Psot that ends exactly at the next SOT or
at EOC), the tile-part headers up to SOD, and in the packet data the bit-stuffing rule: no byte
pair 0xFF90..0xFFFF, except SOP (0xFF91, with Lsop 4 and sequence numbers counting up) and EPH
(0xFF92) where the COD allows them; EOC last. Damage inside code-block data that keeps that
rule cannot be seen. A codestream wrapped in a JP2 file gets its SIZ size checked only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import SlideReadError
from ..kernels import jpeg_entropy as entropy

__all__ = ["check_jpeg_tile", "check_jpeg2k_tile", "JpegTileCheck", "Jpeg2kTileCheck", "tile_check", "StoredTiles"]

#: TIFF compression codes whose tiles are JPEG / JPEG 2000 streams checked before decoding
JPEG_CODES = frozenset({7})
JPEG2K_CODES = frozenset({33003, 33004, 33005, 34712})
#: JPEG start-of-frame markers (SOF0..SOF15 without DHT 0xC4, JPG 0xC8 and DAC 0xCC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
#: markers without a length field
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})

#: what libjpeg would say ("Corrupt JPEG data: ..."), or that no valid encoder writes it, per kernel code
_ENTROPY_WHY = {
    entropy.BAD_HUFFMAN_CODE: "no Huffman code matches (libjpeg would warn 'Corrupt JPEG data: bad Huffman code')",
    entropy.PREMATURE_END: "the scan needs more data than there is (libjpeg would warn 'Corrupt JPEG data: premature end of data segment')",
    entropy.EXTRANEOUS_BYTES: "{detail:,} extraneous bytes after the last block (libjpeg would warn 'Corrupt JPEG data: {detail} extraneous bytes before marker')",
    entropy.BAD_RESTART: "restart marker {found} where RST{expected} must be (libjpeg would warn and resynchronise)",
    entropy.NOT_END: "its last block is followed by marker 0xFF{detail:02X}, not the end of the image",
    entropy.AC_RUN_PAST_63: "a run of AC coefficients reaches coefficient {detail} of 63 (no valid encoder writes it)",
    entropy.DC_CATEGORY: "a DC difference of category {detail} (at most 11 for 8-bit data; no valid encoder writes it)",
    entropy.AC_SIZE: "an AC coefficient of size {detail} (at most 10 for 8-bit data; no valid encoder writes it)",
    entropy.DC_RANGE: "a DC coefficient of {detail}, beyond what its quantisation table allows (no valid encoder writes it)",
}


@dataclass
class _JpegHeader:
    """What the entropy pass needs from a JPEG's header segments (positions in bytes)."""

    sof: int = 0
    precision: int = 8
    width: int = 0
    height: int = 0
    #: per frame component: (id, horizontal sampling, vertical sampling, quantisation table)
    components: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: per scan component: (id, DC table, AC table)
    scan: list[tuple[int, int, int]] = field(default_factory=list)
    scan_start: int = 0
    #: the raw DHT payloads, in order
    dht: list[bytes] = field(default_factory=list)
    #: DC quantiser of each quantisation table defined
    dc_quantisers: dict[int, int] = field(default_factory=dict)
    restart_interval: int | None = None


def _parse_jpeg(data: bytes, tile_width: int, tile_length: int, *, tables_only: bool = False) -> _JpegHeader | str:
    """The header of a JPEG tile (checked as :func:`check_jpeg_tile` says), or why it is damaged.

    ``tables_only``: ``data`` is an abbreviated table stream (a TIFF's JPEGTables): SOI, table
    segments, EOI.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return f"it does not start with a JPEG start-of-image marker (starts with {data[:4].hex(' ') or 'nothing'})"
    head, pos = _JpegHeader(), 2
    while True:  # header segments up to the first start of scan
        while pos + 1 < n and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 2 > n or data[pos] != 0xFF:
            return f"its header is broken at byte {pos:,} (no marker where one must be)"
        marker = data[pos + 1]
        if marker == 0xD9:
            return head if tables_only else "it ends (end-of-image marker) before any image data"
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return f"its header is cut short at byte {pos:,}"
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return f"its marker 0xFF{marker:02X} at byte {pos:,} has a length ({length}) past the end of the tile"
        payload = data[pos + 4 : pos + 2 + length]
        why = _read_segment(head, marker, payload, pos, tile_width, tile_length)
        if why is not None:
            return why
        if marker == 0xDA:
            head.scan_start = pos + 2 + length
            return head
        pos += 2 + length


def _read_segment(head: _JpegHeader, marker: int, payload: bytes, pos: int, tile_width: int, tile_length: int) -> str | None:
    """Record one header segment in ``head``; why it is damaged, or None."""
    if marker in _SOF_MARKERS:
        if len(payload) < 6 or len(payload) != 6 + 3 * payload[5]:
            return f"its frame header (SOF) at byte {pos:,} is too short"
        head.sof, head.precision = marker, payload[0]
        head.height, head.width = (payload[1] << 8) | payload[2], (payload[3] << 8) | payload[4]
        head.components = [(payload[i], payload[i + 1] >> 4, payload[i + 1] & 15, payload[i + 2])
                           for i in range(6, len(payload), 3)]
        if head.width == 0 or head.height == 0:
            return f"its frame header claims {head.width}x{head.height} px (height from a DNL marker is not supported)"
        if head.width > tile_width or head.height > tile_length:
            return (f"its frame header claims {head.width}x{head.height} px but the TIFF declares {tile_width}x{tile_length} px "
                    "tiles: refusing to decode it (a decompression bomb or a damaged header)")
    elif marker == 0xC4:
        head.dht.append(payload)
    elif marker == 0xDB:
        at = 0
        while at < len(payload):
            wide = payload[at] >> 4  # 16-bit entries
            if at + 65 + 64 * wide > len(payload):
                return f"its quantisation table segment (DQT) at byte {pos:,} is malformed"
            head.dc_quantisers[payload[at] & 15] = (payload[at + 1] << 8) | payload[at + 2] if wide else payload[at + 1]
            at += 65 + 64 * wide
    elif marker == 0xDD:
        if len(payload) != 2:
            return f"its restart interval segment (DRI) at byte {pos:,} has the wrong length"
        head.restart_interval = (payload[0] << 8) | payload[1]
    elif marker == 0xDA:
        if not head.sof:
            return "it has no frame header (SOF) before its image data"
        count = payload[0] if payload else 0
        if count == 0 or len(payload) != 4 + 2 * count:
            return f"its scan header (SOS) at byte {pos:,} is malformed"
        head.scan = [(payload[i], payload[i + 1] >> 4, payload[i + 1] & 15) for i in range(1, 1 + 2 * count, 2)]
    return None


def _image_end(data: bytes, head: _JpegHeader) -> int | str:
    """Where the tile's EOI ends (zero padding some writers leave after it skipped), or why it has none."""
    end = len(data)
    while end > head.scan_start and data[end - 1] == 0x00:
        end -= 1
    if end - head.scan_start < 2 or data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return "it does not end with an end-of-image marker: the tile is cut short or overwritten"
    return end


def _check_scan_markers(data: bytes, head: _JpegHeader) -> str | None:
    """EOI last (after zero padding) and, in a sequential scan, no marker but RSTm before it."""
    n, scan = len(data), head.scan_start
    end = _image_end(data, head)
    if isinstance(end, str):
        return end
    body = np.frombuffer(data, np.uint8, end - 2 - scan, scan)
    ff = np.flatnonzero(body[:-1] == 0xFF)
    if ff.size:
        following = body[ff + 1]
        bad = (following != 0x00) & (following != 0xFF) & ((following < 0xD0) | (following > 0xD7))
        if head.sof in _PROGRESSIVE:  # later scans bring their own tables and headers; only an early EOI is damage
            bad &= following == 0xD9
        if bad.any():
            at = int(ff[np.argmax(bad)])
            return (f"marker 0xFF{int(body[at + 1]):02X} inside its image data at byte {scan + at:,} of {n:,} "
                    "(premature end of the image: the tile is damaged)")
    if body.size and body[-1] == 0xFF:
        return "its image data ends in a lone 0xFF byte: the tile is damaged"
    return None


def check_jpeg_tile(data: bytes, tile_width: int, tile_length: int) -> str | None:
    """Why a JPEG tile's bytes cannot be the declared ``tile_width`` x ``tile_length`` px tile, or None.

    Checks the markers, without decoding: SOI first; a frame header (SOF) whose height and width
    are non-zero and no larger than the declared tile; a start of scan; in a sequential
    (baseline) scan no marker other than restart markers before the end; EOI last. The cost is
    one pass of numpy over the bytes. :class:`JpegTileCheck` adds the entropy-coded data.
    """
    head = _parse_jpeg(data, tile_width, tile_length)
    return head if isinstance(head, str) else _check_scan_markers(data, head)


def _huffman_tables(dht: list[bytes]) -> dict[int, entropy.HuffmanTable] | str:
    """The tables of DHT payloads by kernel slot (DC 0..3, AC 4..7; later ones win), or why they are damaged."""
    tables: dict[int, entropy.HuffmanTable] = {}
    for payload in dht:
        pos = 0
        while pos < len(payload):
            if pos + 17 > len(payload) or payload[pos] >> 4 > 1 or payload[pos] & 15 > 3:
                return "its Huffman table segment (DHT) is malformed"
            counts = np.frombuffer(payload, np.uint8, 16, pos + 1)
            total = int(counts.sum())
            values = np.frombuffer(payload, np.uint8, min(total, len(payload) - pos - 17), pos + 17)
            try:
                slot = (payload[pos] >> 4) * 4 + (payload[pos] & 15)
                tables[slot] = entropy.huffman_table(counts, values, ac=slot >= 4)
            except ValueError as exc:
                return f"its Huffman table segment (DHT) is invalid ({exc})"
            pos += 17 + total
    return tables


def _mcu_layout(head: _JpegHeader, quantisers: dict[int, int]) -> tuple[np.ndarray, ...] | str | None:
    """(DC slots, AC slots, scan components) of one MCU's blocks, the DC limit of each scan component
    and the number of MCUs; None when the entropy pass does not apply (see the module docstring),
    or why the frame is damaged. ``quantisers``: the DC quantiser of each table (the tile's and
    the JPEGTables'); a DC is at most 1024 before quantisation, 2047 without a table."""
    if head.sof not in (0xC0, 0xC1) or head.precision != 8 or len(head.scan) != len(head.components):
        return None
    ids = [c[0] for c in head.components]
    if len(set(ids)) != len(ids) or sorted(s[0] for s in head.scan) != sorted(ids):
        return "its scan names components its frame does not have"
    if any(not 1 <= h <= 4 or not 1 <= v <= 4 for _, h, v, _ in head.components):
        return "its frame header has sampling factors outside 1..4"
    sampling = {cid: (h, v) for cid, h, v, _ in head.components}
    table = {cid: tq for cid, _, _, tq in head.components}
    limits = [-(-1024 // quantisers[table[c]]) + 1 if quantisers.get(table[c]) else 2047 for c, _, _ in head.scan]
    hmax, vmax = max(c[1] for c in head.components), max(c[2] for c in head.components)
    dc, ac, comp = [], [], []
    if len(head.scan) == 1:  # one component: one block per MCU, its own block grid
        cid, td, ta = head.scan[0]
        h, v = sampling[cid]
        n_mcus = math.ceil(math.ceil(head.width * h / hmax) / 8) * math.ceil(math.ceil(head.height * v / vmax) / 8)
        dc, ac, comp = [td], [4 + ta], [0]
    else:
        n_mcus = math.ceil(head.width / (8 * hmax)) * math.ceil(head.height / (8 * vmax))
        for index, (cid, td, ta) in enumerate(head.scan):
            h, v = sampling[cid]
            dc += [td] * (h * v)
            ac += [4 + ta] * (h * v)
            comp += [index] * (h * v)
        if len(dc) > 10:
            return f"its MCU would hold {len(dc)} blocks (at most 10)"
    if any(t > 3 for t in dc) or any(t > 7 for t in ac):
        return "its scan header names a Huffman table outside 0..3"
    return np.array(dc, np.int64), np.array(ac, np.int64), np.array(comp, np.int64), np.array(limits, np.int64), n_mcus


class JpegTileCheck:
    """Checks JPEG tiles of one level: :func:`check_jpeg_tile`, then the entropy-coded scan.

    ``jpegtables`` is the level's JPEGTables (an abbreviated table stream, or None); its Huffman
    tables and restart interval apply to every tile unless the tile defines its own.
    """

    def __init__(self, tile_width: int, tile_length: int, jpegtables: bytes | None) -> None:
        self.tile_width, self.tile_length = tile_width, tile_length
        shared = _parse_jpeg(jpegtables, tile_width, tile_length, tables_only=True) if jpegtables else _JpegHeader()
        if isinstance(shared, str):
            raise ValueError(f"the level's JPEGTables are damaged: {shared}")
        tables = _huffman_tables(shared.dht)
        if isinstance(tables, str):
            raise ValueError(f"the level's JPEGTables are damaged: {tables}")
        self._tables, self._restart_interval, self._quantisers = tables, shared.restart_interval, shared.dc_quantisers
        self._stacked: dict[tuple[bytes, ...], tuple[entropy.HuffmanTable, dict[int, entropy.HuffmanTable]]] = {}
        self._layouts: dict[tuple, tuple[np.ndarray, ...] | str | None] = {}

    def _tables_for(self, dht: list[bytes]) -> tuple[entropy.HuffmanTable, dict[int, entropy.HuffmanTable]] | str:
        """The stacked kernel tables (and the slots defined) of the shared tables overridden by a tile's own."""
        key = tuple(dht)
        found = self._stacked.get(key)
        if found is None:
            own = _huffman_tables(dht)
            if isinstance(own, str):
                return own
            tables = {**self._tables, **own}
            found = (entropy.stack_tables(tables), tables)
            if len(self._stacked) < 16:  # tiles of a level share one or a few tables
                self._stacked[key] = found
        return found

    def _layout(self, head: _JpegHeader) -> tuple[np.ndarray, ...] | str | None:
        """:func:`_mcu_layout` of a tile, remembered for the few frame and scan headers of a level."""
        quantisers = {**self._quantisers, **head.dc_quantisers}
        key = (head.sof, head.precision, head.width, head.height, tuple(head.components), tuple(head.scan),
               tuple(quantisers.items()))
        found = self._layouts.get(key, False)
        if found is False:
            found = _mcu_layout(head, quantisers)
            if len(self._layouts) < 16:
                self._layouts[key] = found
        return found

    def why_damaged(self, data: bytes) -> str | None:
        """Why this tile's bytes cannot be a sound tile of the level, or None."""
        head = _parse_jpeg(data, self.tile_width, self.tile_length)
        if isinstance(head, str):
            return head
        layout = self._layout(head)
        if layout is None or isinstance(layout, str):
            return layout if isinstance(layout, str) else _check_scan_markers(data, head)
        tables = self._tables_for(head.dht)
        if isinstance(tables, str):
            return tables
        arrays, defined = tables
        dc, ac, comp, limits, n_mcus = layout
        if not set(dc.tolist()) | set(ac.tolist()) <= defined.keys():
            # tables defined nowhere: libjpeg would use its defaults; markers checked only
            return _check_scan_markers(data, head)
        interval = head.restart_interval if head.restart_interval is not None else self._restart_interval
        code, at, detail = entropy.check_scan(np.frombuffer(data, np.uint8), head.scan_start, *arrays, dc, ac, comp,
                                              limits, n_mcus, interval or 0)
        if code == entropy.SCAN_OK:
            # the walk ended at EOI with no marker on the way but the RSTm expected; EOI must be last
            end = _image_end(data, head)
            return end if isinstance(end, str) else None
        # damaged: a stray marker or a cut tile is said as the marker check says it, else the walk's verdict
        why = _check_scan_markers(data, head)
        if why is not None:
            return why
        expected, found = divmod(int(detail), 256)
        found_name = f"RST{found - 0xD0}" if 0xD0 <= found <= 0xD7 else f"0xFF{found:02X}"
        why = _ENTROPY_WHY[code].format(detail=int(detail), expected=expected, found=found_name)
        return f"its image data is damaged at byte {int(at):,} of {len(data):,}: {why}"


def check_jpeg2k_tile(data: bytes, tile_width: int, tile_length: int) -> str | None:
    """Why a JPEG 2000 tile cannot be the declared tile, or None: the SIZ size check, then the
    codestream's structure (see the module docstring)."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ, in a raw codestream or inside a JP2 box
    if at < 0 or at + 24 > len(data):
        return "it has no JPEG 2000 image header (SOC/SIZ markers)"
    xsiz, ysiz, xo, yo = np.frombuffer(data, ">u4", 4, at + 8).tolist()
    width, height = xsiz - xo, ysiz - yo
    if width <= 0 or height <= 0 or width > tile_width or height > tile_length:
        return (f"its JPEG 2000 header claims {width}x{height} px but the TIFF declares {tile_width}x{tile_length} px "
                "tiles: refusing to decode it")
    return _check_codestream(data) if at == 0 else None


#: marker segments allowed in a JPEG 2000 main header / tile-part header (after SIZ / SOT)
_J2K_MAIN = frozenset({0x50, 0x52, 0x53, 0x55, 0x57, 0x59, 0x5C, 0x5D, 0x5E, 0x5F, 0x60, 0x63, 0x64})
_J2K_TILE_PART = frozenset({0x52, 0x53, 0x58, 0x5C, 0x5D, 0x5E, 0x5F, 0x61, 0x64})


def _j2k_segments(data: bytes, pos: int, allowed: frozenset[int], stop: int, where: str) -> tuple[int, dict[int, bytes]] | str:
    """Walk marker segments from ``pos`` up to marker 0xFF``stop``; (its position, the first payload
    of each marker) or why the header is damaged."""
    n, seen = len(data), {}
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return f"its JPEG 2000 {where} is broken at byte {pos:,} (no marker where one must be)"
        marker = data[pos + 1]
        if marker == stop:
            return pos, seen
        if marker not in allowed:
            return f"its JPEG 2000 {where} holds marker 0xFF{marker:02X} at byte {pos:,}, which does not belong there"
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return f"its JPEG 2000 marker 0xFF{marker:02X} at byte {pos:,} has a length ({length}) past the end of the tile"
        seen.setdefault(marker, data[pos + 4 : pos + 2 + length])
        pos += 2 + length


def _packet_data_why(data: bytes, start: int, end: int, sop: bool, eph: bool, packet: int) -> tuple[str | None, int]:
    """Check packet data ``data[start:end]`` against bit stuffing: (why it is damaged or None, the next SOP number)."""
    body = np.frombuffer(data, np.uint8, end - start, start)
    ff = np.flatnonzero(body[:-1] == 0xFF)
    ff = ff[body[ff + 1] > 0x8F]
    skip_to = 0
    for i in ff.tolist():
        if i < skip_to:
            continue
        second = int(body[i + 1])
        if sop and second == 0x91:
            if i + 6 > body.size or body[i + 2] != 0 or body[i + 3] != 4:
                return f"its start-of-packet marker at byte {start + i:,} is malformed", packet
            number = (int(body[i + 4]) << 8) | int(body[i + 5])
            if number < packet:
                return (f"its packet numbers go back from {packet - 1} to {number} at byte {start + i:,} "
                        "(the data is damaged)"), packet
            packet, skip_to = number + 1, i + 6
        elif not (eph and second == 0x92):
            return (f"its packet data holds the byte pair ff {second:02x} at byte {start + i:,} of {len(data):,}, "
                    "which bit stuffing rules out: the image data is damaged"), packet
    if end > start and body[-1] == 0xFF:
        return f"its packet data ends in a lone 0xFF byte at byte {end - 1:,}: the image data is damaged", packet
    return None, packet


def _check_codestream(data: bytes) -> str | None:
    """Why a raw JPEG 2000 codestream (SOC at byte 0) is damaged, or None (see the module docstring)."""
    n = len(data)
    size_length = (data[4] << 8) | data[5]
    if size_length < 41 or 4 + size_length > n:
        return "its JPEG 2000 image header (SIZ) is malformed"
    xsiz, ysiz, xo, yo, xt, yt, xto, yto = np.frombuffer(data, ">u4", 8, 8).tolist()
    if xt == 0 or yt == 0:
        return "its JPEG 2000 image header (SIZ) has a zero tile size"
    tiles = math.ceil((xsiz - xto) / xt) * math.ceil((ysiz - yto) / yt)
    found = _j2k_segments(data, 4 + size_length, _J2K_MAIN, 0x90, "main header")
    if isinstance(found, str):
        return found
    pos, main = found
    if 0x52 not in main or 0x5C not in main or not main[0x52]:
        return "its JPEG 2000 main header lacks the coding (COD) or quantisation (QCD) segment"
    end = n
    while end > pos and data[end - 1] == 0x00:  # zero padding after EOC
        end -= 1
    if end - pos < 2 or data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return "it does not end with a JPEG 2000 end-of-codestream marker: the tile is cut short or overwritten"
    eoc, packets, first = end - 2, {}, pos
    while pos < eoc:
        if data[pos : pos + 4] != b"\xff\x90\x00\x0a" or pos + 12 > eoc:
            where = "after the main header" if pos == first else "where the previous one's length (Psot) ends"
            return f"no tile-part starts at byte {pos:,} ({where}) of its JPEG 2000 codestream: the tile is damaged"
        tile, psot = (data[pos + 4] << 8) | data[pos + 5], int.from_bytes(data[pos + 6 : pos + 10], "big")
        if tile >= tiles:
            return f"its JPEG 2000 tile-part at byte {pos:,} names tile {tile} of {tiles}"
        part_end = eoc if psot == 0 else pos + psot
        if part_end > eoc or psot and psot < 14:
            return (f"its JPEG 2000 tile-part at byte {pos:,} claims {psot:,} bytes, past the end of the codestream "
                    f"at byte {eoc:,}: the tile is cut short or damaged")
        found = _j2k_segments(data, pos + 12, _J2K_TILE_PART, 0x93, "tile-part header")
        if isinstance(found, str):
            return found
        sod, local = found
        if sod + 2 > part_end:
            return f"its JPEG 2000 tile-part header at byte {pos:,} runs past the tile-part's length"
        style = local.get(0x52, main[0x52])[:1] or b"\0"
        why, packets[tile] = _packet_data_why(data, sod + 2, part_end, bool(style[0] & 2), bool(style[0] & 4), packets.get(tile, 0))
        if why is not None:
            return why
        pos = part_end
    return None


class Jpeg2kTileCheck:
    """Checks JPEG 2000 tiles of one level (:func:`check_jpeg2k_tile`)."""

    def __init__(self, tile_width: int, tile_length: int) -> None:
        self.tile_width, self.tile_length = tile_width, tile_length

    def why_damaged(self, data: bytes) -> str | None:
        """Why this tile's bytes cannot be a sound tile of the level, or None."""
        return check_jpeg2k_tile(data, self.tile_width, self.tile_length)


def tile_check(page) -> JpegTileCheck | Jpeg2kTileCheck | None:
    """The checker of a tiled tifffile page's tiles, or None when its compression has none."""
    compression = int(page.compression)
    if compression in JPEG_CODES:
        return JpegTileCheck(int(page.tilewidth), int(page.tilelength), page.jpegtables)
    if compression in JPEG2K_CODES:
        return Jpeg2kTileCheck(int(page.tilewidth), int(page.tilelength))
    return None


class StoredTiles:
    """The stored tiles of a slide's tiled levels: read (``os.pread``) and check them.

    ``pages`` are tifffile pages, one per level (None: a level not checked, e.g. untiled).
    :meth:`verify` remembers the tiles it found sound (a bool array per level), so each is read
    and checked once.
    """

    def __init__(self, path, pages: list) -> None:
        self.name = os.path.basename(path)
        self._pages = pages
        self._checks = [None if p is None else tile_check(p) for p in pages]
        self._offsets = [None if p is None else np.asarray(p.dataoffsets, np.int64) for p in pages]
        self._counts = [None if p is None else np.asarray(p.databytecounts, np.int64) for p in pages]
        self._verified = [None if p is None else np.zeros(len(p.dataoffsets), bool) for p in pages]
        self._fd = os.open(path, os.O_RDONLY)

    def damaged(self, level: int, index: int, why: str) -> SlideReadError:
        """The error for tile ``index`` of ``level``, naming its row and column."""
        page = self._pages[level]
        across = math.ceil(page.imagewidth / page.tilewidth)
        return SlideReadError(
            f"tile {index} (row {index // across}, column {index % across}) of level {level} of '{self.name}' "
            f"is damaged: {why}"
        )

    def read(self, level: int, index: int) -> bytes | None:
        """The stored bytes of tile ``index`` of ``level``, checked the first time they are read
        (the file is taken not to change under an open slide), None for a sparse tile (byte
        count 0); SlideReadError naming the tile when it is damaged."""
        count = int(self._counts[level][index])
        if count == 0:
            return None
        data = os.pread(self._fd, count, int(self._offsets[level][index]))
        if len(data) != count:
            raise self.damaged(level, index, f"it is cut short ({len(data):,} of {count:,} bytes): the file is truncated")
        check = self._checks[level]
        if check is not None and not self._verified[level][index]:  # each tile is checked once
            why = check.why_damaged(data)
            if why is not None:
                raise self.damaged(level, index, why)
            self._verified[level][index] = True
        return data

    def verify(self, level: int, x0: int, y0: int, x1: int, y1: int) -> None:
        """Check the stored tiles under level pixels ``[x0, x1) x [y0, y1)`` not checked before."""
        page, verified = self._pages[level], self._verified[level]
        if page is None or self._checks[level] is None or x1 <= x0 or y1 <= y0:
            return
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = math.ceil(page.imagewidth / tw)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                index = row * across + col
                if not verified[index]:
                    self.read(level, index)

    def close(self) -> None:
        """Close the file descriptor."""
        try:
            os.close(self._fd)
        except OSError:
            pass
