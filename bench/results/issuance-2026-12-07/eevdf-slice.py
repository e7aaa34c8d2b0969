#!/usr/bin/env python3
"""Twenty-third session (bench/README.md): set an EEVDF custom slice (sched_attr.sched_runtime, Linux >= 6.12) on every SCHED_OTHER
thread of a process: eevdf-slice.py PID SLICE_NS. Leaves SCHED_IDLE/BATCH threads alone."""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_sched_setattr, SYS_sched_getattr = 314, 315
class Attr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
                ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64), ("util_min", ctypes.c_uint32), ("util_max", ctypes.c_uint32)]
pid, slice_ns = int(sys.argv[1]), int(sys.argv[2])
for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
    attr = Attr(); attr.size = ctypes.sizeof(Attr)
    if libc.syscall(SYS_sched_getattr, tid, ctypes.byref(attr), ctypes.sizeof(Attr), 0) != 0:
        print("getattr", tid, os.strerror(ctypes.get_errno())); continue
    name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
    if attr.policy != 0:
        print(tid, name, "policy", attr.policy, "left alone"); continue
    attr.runtime = slice_ns; attr.size = ctypes.sizeof(Attr)
    if libc.syscall(SYS_sched_setattr, tid, ctypes.byref(attr), 0) != 0:
        print("setattr", tid, os.strerror(ctypes.get_errno())); continue
    check = Attr(); libc.syscall(SYS_sched_getattr, tid, ctypes.byref(check), ctypes.sizeof(Attr), 0)
    print(tid, name, "slice", check.runtime)
