"""Twenty-second session: one Postgres backend's time from a machine-wide scheduler trace.

    perf record -a -e sched:sched_switch -e sched:sched_wakeup -g -o sched.data -- sleep 1
    perf script -i sched.data -F comm,tid,time,event,trace,ip,sym > sched.txt
    python3 writer-backend-schedule.py sched.txt BACKEND_PID

Each switch-out is classified by its kernel stack and timed to the backend's wake-up, and from
there to its next switch-in (waiting for a core). See writer-backend-schedule-64.txt.
"""
import re, sys, collections
pid=sys.argv[2]
blocks=open(sys.argv[1]).read().split('\n\n')
events=[]
for b in blocks:
    lines=b.strip().split('\n')
    if not lines or not lines[0].strip(): continue
    m=re.match(r"\s*\S+\s+(\d+)\s+([\d.]+): (sched:\w+): (.*)", lines[0])
    if not m: continue
    t=float(m.group(2)); ev=m.group(3); tr=m.group(4)
    stack=' '.join(l.split()[-1] for l in lines[1:])
    events.append((t,ev,tr,stack))
events.sort(key=lambda e:e[0])
oncpu=0; runq=0; sleep=collections.Counter(); runq_after=collections.Counter()
t_on=None; off=None; wake=None
count_sleep=collections.Counter()
for t,ev,tr,stack in events:
    if ev=='sched:sched_switch' and f'prev_pid={pid} ' in tr:
        if t_on is not None: oncpu+=t-t_on
        st=re.search(r'prev_state=(\S+)',tr).group(1)
        if st.startswith('R'): reason='preempted'
        elif 'epoll_wait' in stack: reason='waiting for the broker (epoll)'
        elif 'fdatasync' in stack or 'XLogFlush' in stack: reason='commit flush'
        elif 'futex' in stack or 'PGSemaphore' in stack or 'LWLock' in stack: reason='lock/semaphore'
        elif 'pwrite' in stack or 'pread' in stack: reason='file io'
        else: reason='other:'+st
        off=(t,reason); wake=None; t_on=None
    elif ev=='sched:sched_wakeup' and f'pid={pid} ' in tr:
        if off and wake is None: wake=t
    elif ev=='sched:sched_switch' and f'next_pid={pid} ' in tr:
        if off:
            t0,reason=off
            if reason=='preempted':
                runq+=t-t0; runq_after['preempted']+=t-t0
            else:
                w=wake if wake else t
                sleep[reason]+=w-t0; count_sleep[reason]+=1
                runq+=t-w; runq_after[reason]+=t-w
        t_on=t; off=None
span=events[-1][0]-events[0][0]
print(f"span {span:.3f}s; on cpu {oncpu:.3f}s ({oncpu/span*100:.0f}%); runnable waiting {runq:.3f}s ({runq/span*100:.0f}%)")
for k,v in sleep.most_common(): print(f"  sleeping, {k}: {v:.3f}s ({v/span*100:.0f}%), {count_sleep[k]} times, {v/count_sleep[k]*1e6:.0f} us each; then waiting for a core {runq_after[k]*1e3:.0f} ms")
print(f"  preempted, waiting for a core: {runq_after['preempted']*1e3:.0f} ms")
