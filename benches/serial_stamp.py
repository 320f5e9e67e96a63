# Reads a VMM's serial output on stdin; writes to argv[1] the arrival times
# (CLOCK_MONOTONIC) of the first and the last chunk that held a heartbeat
# ('.'), and the largest gap between such chunks (for a source: the noise
# floor before the migration, what the busy machine alone does to the
# heartbeats). It says it is ready (file argv[1].ready) before the migration
# starts: a reader that starts late would stamp the first beats late (they
# wait in the pipe). Used by local_handover.sh and switchover.sh. A fourth
# field is the first `GAP <us>` line the guest printed before its second
# heartbeat (its stall meter, `gap=`; for a destination: the switchover as
# the guest's own TSC saw it), in seconds, or -1 if none.
import os, re, sys, time
open(sys.argv[1] + ".ready", "w").close()
first = last = None; most = 0.0; gap = -1.0; text = b""
while True:
    b = os.read(0, 65536)
    if not b: break
    if text.count(b".") < 2:
        text += b
        m = re.search(rb"\nGAP (\d+)\n", text[:text.find(b".", text.find(b".") + 1)] if text.count(b".") >= 2 else text)
        if m and gap < 0: gap = int(m.group(1)) / 1e6
    if b"." in b:
        t = time.monotonic(); first = first or t
        if last is not None: most = max(most, t - last)
        last = t
open(sys.argv[1], "w").write("%r %r %r %r\n" % (first, last, most, gap))
