"""Links: messages of frames over a Unix socket pair made before the peer process starts.

A node and each of its workers speak over the two ends of one ``socketpair``: the node makes it
before it forks or spawns the worker, which inherits its end. Two reasons, against the ZeroMQ
``ipc://`` socket they used before:

- a hop is one write and one wake-up of the reader: ZeroMQ's path wakes the sender's I/O thread,
  the receiver's I/O thread and then the receiver, each on whichever core is idle (a bare
  ZeroMQ ipc round trip took 90-97 us here, a socket pair's 44-47 us; bench/README.md);
- who sent a message is the link it came on. There is no path another process can open and no
  routing id to name: task code cannot speak as another worker of its node, nor hold a worker's
  id before that worker connects (docs/threat-model.md, "one socket per worker, made before it
  starts").

Wire: a message is its frame count (u32, 1 to ``MAX_FRAMES``), the frames' lengths (u64 each),
then the frames end to end. A frame of ``FILE_BYTES`` or more (on Linux) does not travel in the
stream: it is written to a sealed memory file (``memfd``, no write, grow or shrink once sealed)
whose descriptor rides with the message's first byte (``SCM_RIGHTS``), its length marked
``IN_FILE``; the reader checks the seals and the size and maps it read-only, uncopied. Why: a
stream moves a socket buffer's worth (~200 KiB) per wake-up of each end's hub thread, each
taking the GIL again behind whatever thread holds it (500 units of 1 MiB took 30-45 % longer
through the stream than through ZeroMQ, whose own threads pump without the GIL); a file is one
write and one map. A peer that breaks the framing (a count or size out of bounds, a file that
is not a sealed one of its size, more descriptors than messages) gets its link closed: what it
sent whole before stands.

This module does no polling: the hub (hub.py) polls the links' descriptors with its sockets and
calls ``read`` and ``flush`` when they are ready.

A node uses links only when started with ``--worker-links`` ($ACTORS_WORKER_LINKS=1), an
experiment: small messages and 1 MB units gained, large values between workers of two nodes
lost a third (each hop writes its memory file whole before the next starts, where ZeroMQ's
threads stream through every hop at once): bench/README.md, "A node's workers over socket
pairs", says what was measured and what would keep the gains.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import socket
import stat
import struct
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, cast

MAX_FRAMES = 64  # the runtime's messages have five at most (a relayed data reply)
_COUNT = struct.Struct("<I")
_LENGTHS = [struct.Struct(f"<{n}Q") for n in range(MAX_FRAMES + 1)]
#: A frame at least this large goes in a sealed memory file (see "Wire"), where Linux has them
#: ($ACTORS_LINK_FILE_BYTES, for measuring another bound; each end decides for what it sends).
FILE_BYTES = (int(os.environ.get("ACTORS_LINK_FILE_BYTES", 256 << 10))
              if hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS") else 1 << 62)
IN_FILE = 1 << 63  # a length with this bit: the frame is in the message's next memory file
_SEALS = getattr(fcntl, "F_SEAL_WRITE", 0) | getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(
    fcntl, "F_SEAL_GROW", 0)
_MAX_FDS = 8  # descriptors one read takes (more: the kernel closes them, and the link breaks)
_FDS_AHEAD = 64  # descriptors received and not yet claimed by a message: more breaks the link
_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * 4)
# ints, as _SEND_FLAGS: an IntFlag's | and & run in Python, two calls a message read
_RECEIVE_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
# The descriptors of the memory files received last, by their mapping (id), so that a frame
# relayed on as it came (a node's: a worker's data to another worker) passes the same sealed
# file on, uncopied; the oldest closed past _KEPT_FILES (a node may hold many results).
_KEPT_FILES = 64
_kept: OrderedDict[int, tuple[weakref.ref[mmap.mmap], int]] = OrderedDict()
_kept_lock = threading.Lock()  # (a mapping's last reference may go on any thread)
_READ_BYTES = 256 << 10  # one read's buffer
_READS_A_TURN = 16  # reads per ``read`` call: a busy link leaves the hub time for the others
#: A message this large is read into a buffer of its own, in place (not grown chunk by chunk):
#: an anonymous mapping, whose pages are taken as the peer's bytes fill them, not when its
#: header names the size (a header costs a peer 12 bytes; the size it names, nothing yet).
_BIG_BYTES = 1 << 20
#: Frames this large are handed over as read-only views of the message's buffer, uncopied
#: (the hub's "Bulk data"); smaller ones as bytes.
VIEW_BYTES = 64 << 10
#: Bytes a link holds for a peer that does not read: past it, messages to that peer are dropped
#: (as a ZeroMQ socket drops past its high-water mark, but counted in bytes).
MAX_BACKLOG_BYTES = 2 << 30
_IOV_MAX = 512  # buffers handed to one sendmsg (Linux takes 1,024)


class Link:
    """One end of a socket pair, non-blocking, owned by the hub thread."""

    def __init__(self, sock: socket.socket, identity: bytes = b"", *, views: bool = False,
                 max_message: int = -1, blocking_sends: bool = False) -> None:
        """``blocking_sends``: a send waits until the socket took the whole message (reads
        never wait). For the end whose one peer is trusted to read (a worker's, to its node):
        the write then runs without the GIL from its first byte to its last, where a write
        that takes what fits and waits for the next poll takes the GIL again for every socket
        buffer's worth, behind the threads that hold it (a driver slicing in a tight loop). A
        peer that may not read (a node's workers) never makes the hub thread wait."""
        sock.setblocking(blocking_sends)
        self.sock = sock
        self.fd = sock.fileno()
        self.identity = identity
        self._view_bytes = VIEW_BYTES if views else -1
        self._max_message = max_message  # bytes of one message's frames (-1: no bound)
        self._in = b""  # what was read and is not a whole message yet
        # Reads land here (a fresh 256 KiB bytes object a read took a mapping and its release
        # from the allocator each time: ~10 us a hop), then what came is copied out.
        self._read_buf = bytearray(_READ_BYTES)
        # A large message being read in place: its frames' lengths, its buffer, bytes filled.
        self._big: tuple[tuple[int, ...], mmap.mmap, int] | None = None
        # What the peer has not taken yet: bytes, and the memory files that go with the first
        # of them (the descriptors are ours until sent, then closed).
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._out_bytes = 0
        self._fds: deque[int] = deque()  # received with the stream, not yet claimed
        # The memory files of the message at the head of ``_in``, claimed once its header came
        self._files: dict[int, memoryview] | None = None
        self.closed = False
        self.broken = ""  # why the link was closed on the peer (its framing), if it was

    # --- sending -----------------------------------------------------------

    @property
    def backlog(self) -> bool:
        """Bytes wait for the peer to read: the hub polls for writability until they left."""
        return bool(self._out)

    def send(self, frames: Sequence[bytes | memoryview]) -> bool:
        """Queue one message and write what the socket takes now; False when it was dropped
        (the link is closed, or the peer left more than ``MAX_BACKLOG_BYTES`` unread)."""
        if self.closed:
            return False
        count = len(frames)
        if not 0 < count <= MAX_FRAMES:
            raise ValueError(f"a message has 1 to {MAX_FRAMES} frames, not {count}")
        sizes = [memoryview(frame).nbytes for frame in frames]
        files: list[int] = []
        parts: list[bytes | memoryview] = [b""]
        try:
            for i, (frame, size) in enumerate(zip(frames, sizes, strict=True)):
                if size >= FILE_BYTES:
                    kept = _kept_file(frame)
                    files.append(kept if kept is not None else _sealed_file(frame))
                    sizes[i] = size | IN_FILE
                else:
                    parts.append(frame)
        except OSError:
            _close_all(files)
            raise
        parts[0] = _COUNT.pack(count) + _LENGTHS[count].pack(*sizes)
        total = sum(memoryview(part).nbytes for part in parts)
        if self._out:
            # What the peer took since goes on here, not only when the hub next polls: a long
            # turn of the hub's (a driver's burst of units) sends all through it.
            self.flush()
        if self._out:
            if self._out_bytes + total > MAX_BACKLOG_BYTES:
                _close_all(files)
                return False
            self._queue(parts, 0, files)
            return True
        try:
            sent = self._sendmsg(parts, files)
        except BlockingIOError:
            sent = 0
        except OSError:
            _close_all(files)
            self.close()
            return False
        if sent:
            _close_all(files)  # (they went with the first byte: the peer holds its own now)
            files = []
        if sent < total:
            self._queue(parts, sent, files)
        return True

    def _sendmsg(self, parts: list[bytes | memoryview], files: list[int]) -> int:
        """``sendmsg`` of the parts, with the files. A message with files (its large frames)
        goes through ``_LIBC``'s, which keeps the GIL, where every part is bytes, as the files
        were made (see ``_load_libc``): one that gave it up would wait behind the thread that
        holds it, a driver slicing large units. Any other through the socket's own (it gives
        the GIL up once, as ZeroMQ's send does; building ctypes' structures for it cost ~15
        us a message), and one ``_LIBC``'s could not send now on a blocking end (it waits)."""
        if files and _LIBC is not None and all(type(part) is bytes for part in parts):
            try:
                return _sendmsg_keeping_gil(_LIBC, self.fd, cast("list[bytes]", parts), files)
            except BlockingIOError:
                if not self.sock.getblocking():
                    raise
        return self.sock.sendmsg(parts, _rights(files))

    def _queue(self, parts: list[bytes | memoryview], skip: int, files: list[int]) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            if skip >= view.nbytes:
                skip -= view.nbytes
                continue
            if skip:
                view, skip = view[skip:], 0
            self._out.append((view, files))
            files = []
            self._out_bytes += view.nbytes

    def flush(self) -> None:
        """Write what waits, as far as the socket takes it (the hub calls it when writable)."""
        out = self._out
        while out:
            # Up to the next part that carries files (theirs go with its first byte, alone)
            files = out[0][1]
            views = [out[0][0]]
            for view, more in itertools.islice(out, 1, _IOV_MAX):
                if more:
                    break
                views.append(view)
            try:
                sent = self.sock.sendmsg(views, _rights(files))
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            if sent and files:
                _close_all(files)
                out[0] = (out[0][0], [])
            self._out_bytes -= sent
            while sent:
                first = out[0][0]
                if first.nbytes <= sent:
                    sent -= first.nbytes
                    out.popleft()
                else:
                    out[0], sent = (first[sent:], []), 0

    # --- receiving ---------------------------------------------------------

    def read(self) -> list[list[bytes]]:
        """The messages that arrived whole since the last call (a frame of ``VIEW_BYTES`` or
        more, on a link with views, as a read-only memoryview, typed bytes). Once the peer
        closed its end, or broke the framing, ``closed`` is set and nothing more comes."""
        messages: list[list[bytes]] = []
        for _ in range(_READS_A_TURN):
            if self.closed:
                break
            if self._big is not None:
                if not self._fill(messages):
                    break
                continue
            got = self._receive(self._read_buf)
            if got is None:
                break
            if not got:
                self.close()
                break
            with memoryview(self._read_buf) as view:
                data = view[:got].tobytes()
            self._parse(self._in + data if self._in else data, messages)
            if got < _READ_BYTES:
                break  # (the socket is likely empty: the next poll says when it is not)
        return messages

    def _receive(self, into: bytearray | memoryview) -> int | None:
        """Bytes read into ``into`` (0: the peer closed its end; None: none now), and the
        descriptors that came with them queued (``_fds``)."""
        try:
            got, ancillary, flags, _ = self.sock.recvmsg_into(
                [into], _ANCILLARY, _RECEIVE_FLAGS)
        except BlockingIOError:
            return None
        except OSError:
            return 0
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if flags & _CTRUNC or len(self._fds) > _FDS_AHEAD:
            self._break("more memory files than its messages name")
            return None
        return got

    def _parse(self, buf: bytes, messages: list[list[bytes]]) -> None:
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (count,) = _COUNT.unpack_from(buf, pos)
            if not 0 < count <= MAX_FRAMES:
                self._break(f"a message of {count} frames")
                return
            start = pos + 4 + 8 * count
            if start > end:
                break
            lengths: tuple[int, ...] = _LENGTHS[count].unpack_from(buf, pos + 4)
            files = self._files
            if files is None:  # (its files came with its first byte: they are queued by now)
                files = self._files = self._claim(lengths)
                if files is None:
                    return
            # The frames in the stream: a file's counts as empty there.
            inline = tuple(0 if length & IN_FILE else length for length in lengths)
            total = sum(inline)
            if 0 <= self._max_message < total + sum(len(f) for f in files.values()):
                self._break(f"a message over the bound of {self._max_message} bytes")
                return
            if end - start < total:
                if total >= _BIG_BYTES:  # read the rest in place, into a buffer of its own
                    try:
                        body = mmap.mmap(-1, total)
                    except (OSError, OverflowError, MemoryError) as exc:
                        self._break(f"a message of {total} bytes: {exc}")
                        return
                    body[:end - start] = buf[start:]
                    self._big = (inline, body, end - start)
                    pos = end
                break
            messages.append(self._frames(buf, start, inline))
            pos = start + total
        self._in = buf[pos:] if pos < end else b""

    def _claim(self, lengths: tuple[int, ...]) -> dict[int, memoryview] | None:
        """The memory files of a message's frames marked ``IN_FILE``, checked and mapped (None:
        the link broke: a file missing, not sealed, or not of its frame's size)."""
        files: dict[int, memoryview] = {}
        for index, length in enumerate(lengths):
            if not length & IN_FILE:
                continue
            if not self._fds:
                self._break("a frame in a memory file that did not come")
                return None
            fd = self._fds.popleft()
            try:
                info = os.fstat(fd)
                size = length & ~IN_FILE
                if not stat.S_ISREG(info.st_mode) or info.st_size != size or size == 0:
                    raise ValueError(f"not a file of {size} bytes")
                if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
                    raise ValueError("not sealed against writes")
                # (its pages mapped at once: a fault a page cost more than one call for all)
                mapped = mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
            except (OSError, ValueError) as exc:  # (a plain file has no seals: EINVAL)
                os.close(fd)
                self._break(f"a frame's memory file: {exc}")
                return None
            files[index] = memoryview(mapped)
            _keep(mapped, fd)
        return files

    def _fill(self, messages: list[list[bytes]]) -> bool:
        """Read into the large message under way; False when the socket has nothing now."""
        assert self._big is not None
        lengths, body, filled = self._big
        with memoryview(body) as view:
            got = self._receive(view[filled:])
        if got is None:
            return False
        if not got:
            self.close()
            return False
        filled += got
        if filled < len(body):
            self._big = (lengths, body, filled)
            return True
        self._big = None
        messages.append(self._frames(body, 0, lengths))
        return True

    def _frames(self, buf: bytes | mmap.mmap, start: int, lengths: tuple[int, ...]) -> list[bytes]:
        """The message whose frames in the stream start at ``start`` (and whose other frames
        were in memory files: ``_files``, taken here)."""
        frames: list[bytes] = []
        files, self._files = self._files or {}, None
        view_bytes = self._view_bytes
        for index, length in enumerate(lengths):
            if index in files:  # (read-only: mapped so)
                frames.append(files[index] if view_bytes >= 0
                              else files[index].tobytes())  # type: ignore[arg-type]
            elif 0 <= view_bytes <= length:
                # (the buffer stays alive while a view of it does; nothing writes to it again)
                view = memoryview(buf)[start:start + length].toreadonly()
                frames.append(view)  # type: ignore[arg-type]
            else:
                frames.append(bytes(buf[start:start + length]))
            start += length
        return frames

    def _break(self, why: str) -> None:
        self.broken = why
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for _view, files in self._out:
                _close_all(files)
            self._out.clear()
            self._out_bytes = 0
            _close_all(self._fds)
            self._fds.clear()
            self._in, self._big, self._read_buf, self._files = b"", None, bytearray(), None
            self.sock.close()


def _keep(mapped: mmap.mmap, fd: int) -> None:
    """Keep ``fd``, the sealed file ``mapped`` maps, while both live (see ``_kept``)."""
    key = id(mapped)
    with _kept_lock:
        _kept[key] = (weakref.ref(mapped), fd)
        while len(_kept) > _KEPT_FILES:
            _, (_, oldest) = _kept.popitem(last=False)
            os.close(oldest)
    weakref.finalize(mapped, _forget, key, fd)


def _forget(key: int, fd: int) -> None:
    with _kept_lock:
        entry = _kept.get(key)
        if entry is not None and entry[1] == fd:
            del _kept[key]
            os.close(fd)


def _kept_file(frame: bytes | memoryview) -> int | None:
    """A new descriptor of the sealed file ``frame`` is the whole of, if it came in one and
    its descriptor is kept; else None."""
    mapped = getattr(frame, "obj", None)
    if not isinstance(mapped, mmap.mmap) or memoryview(frame).nbytes != len(mapped):
        return None
    with _kept_lock:
        entry = _kept.get(id(mapped))
        if entry is None or entry[0]() is not mapped:
            return None
        return os.dup(entry[1])


def _load_libc() -> Any:
    """The C library through ``ctypes.PyDLL``, whose calls keep the GIL (None where it or
    ``memfd_create`` is missing). For the calls that make a frame's memory file: none of them
    blocks, and each that gives the GIL up waits to get it back behind a thread of the
    process that holds it, up to the 5 ms switch interval (a driver slicing 1 MiB units in a
    tight loop: five such calls a frame starved its worker's link; bench/README.md, "Fewer
    Python calls a task")."""
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        functions = (("memfd_create", [ctypes.c_char_p, ctypes.c_uint], ctypes.c_int),
                     ("write", [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_ssize_t),
                     ("fcntl", [ctypes.c_int, ctypes.c_int, ctypes.c_int], ctypes.c_int),
                     ("close", [ctypes.c_int], ctypes.c_int),
                     ("sendmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_int], ctypes.c_ssize_t))
        for name, argtypes, restype in functions:
            function = getattr(libc, name)
            function.argtypes, function.restype = argtypes, restype
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc() if FILE_BYTES < 1 << 62 else None
#: A larger frame is copied into its memory file by ``os.write``, which gives the GIL up for the
#: copy (one release, ~5 ms of copying a 20 MB result, the process's other threads running
#: meanwhile; keeping it cost those results ~9 % of their rate). Up to it, the copy keeps the GIL
#: as the other calls do: a driver's 1 MiB units each copied without it still starved its link
#: (4 runs of 8 not done in 30 s).
_COPY_KEEPING_GIL = 4 << 20


def _os_error() -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def _sealed_file(frame: bytes | memoryview) -> int:
    """A memory file holding ``frame``, sealed against every change (see "Wire")."""
    if _LIBC is not None and type(frame) is bytes:
        return _sealed_file_keeping_gil(_LIBC, frame)
    fd = os.memfd_create("pydra-link", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with memoryview(frame) as view, view.cast("B") as data:
            written = 0
            while written < data.nbytes:
                written += os.write(fd, data[written:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sealed_file_keeping_gil(libc: Any, frame: bytes) -> int:
    """``_sealed_file`` through ``libc``'s calls, which keep the GIL (see ``_load_libc``);
    the copy into it too, up to ``_COPY_KEEPING_GIL`` bytes."""
    fd = libc.memfd_create(b"pydra-link", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    if fd < 0:
        raise _os_error()
    try:
        size, written = len(frame), 0
        if size > _COPY_KEEPING_GIL:  # (see _COPY_KEEPING_GIL)
            with memoryview(frame) as data:
                while written < size:
                    written += os.write(fd, data[written:])
        # (c_char_p points at the bytes' own buffer, no copy; ``frame`` keeps it alive)
        address = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p).value or 0
        while written < size:
            count = libc.write(fd, address + written, size - written)
            if count < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                raise _os_error()
            written += count
        if libc.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL) < 0:
            raise _os_error()
    except BaseException:
        libc.close(fd)
        raise
    return fd


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_IOVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)  # (an int: IntFlag's | is Python)
_CMSG_HEADER = struct.Struct("@Nii")  # struct cmsghdr: length, level, type (then the data)


def _sendmsg_keeping_gil(libc: Any, fd: int, parts: list[bytes], files: list[int]) -> int:
    """``socket.sendmsg(parts, _rights(files), MSG_DONTWAIT | MSG_NOSIGNAL)`` through
    ``libc``'s, which keeps the GIL (see ``_load_libc``): bytes sent, ``BlockingIOError`` when
    the socket takes none now, ``OSError`` as the socket's own raises it."""
    count = min(len(parts), _IOV_MAX)
    vectors = (_IOVec * count)()
    # (c_char_p points at each bytes object's own buffer; ``parts`` keeps them alive)
    pointers = [ctypes.c_char_p(part) for part in parts[:count]]
    for vector, pointer, part in zip(vectors, pointers, parts, strict=False):
        vector.base = ctypes.cast(pointer, ctypes.c_void_p).value
        vector.len = len(part)
    header = _MsgHdr(None, 0, vectors, count, None, 0, 0)
    if files:
        data = array.array("i", files).tobytes()
        space = socket.CMSG_SPACE(len(data))
        control = ctypes.create_string_buffer(
            _CMSG_HEADER.pack(socket.CMSG_LEN(len(data)), socket.SOL_SOCKET, socket.SCM_RIGHTS)
            + data, space)
        header.control, header.controllen = ctypes.addressof(control), space
    while True:
        sent = libc.sendmsg(fd, ctypes.byref(header), _SEND_FLAGS)
        if sent >= 0:
            return int(sent)
        code = ctypes.get_errno()
        if code == errno.EINTR:
            continue
        if code in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise BlockingIOError(code, os.strerror(code))
        raise OSError(code, os.strerror(code))


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fds`` with a message (none: no data)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close_all(fds: Sequence[int]) -> None:
    if _LIBC is not None:  # (keeping the GIL, as the files were made: see _load_libc)
        for fd in fds:
            _LIBC.close(fd)
        return
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def pair() -> tuple[socket.socket, socket.socket]:
    """A link's two ends (ours, the peer's), neither inheritable: the peer's end is handed to
    one process on purpose (``pass_fds``, or a fork that keeps it)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
