#!/bin/sh
# Runs in the guest (bench_anchors): one line per user-space process,
#   proc <pid> <comm> <rss KiB> <pss KiB> <workload>
# where workload is 1 when the command line carries the bench's marker
# (the containers' own processes) and 0 otherwise. Kernel threads (no
# VmRSS) and this listing with its ancestors (the test channel) are left
# out.
# Built from shell builtins and one grep per process, so the listing
# disturbs what it measures as little as it can.
marker=1000042
# This shell and its ancestors up to PID 1 (the test channel's shells).
self=""
p=$$
while [ -n "$p" ] && [ "$p" -gt 1 ]; do
    self="$self $p"
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || break
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    p=$2
done
for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    read -r comm < "$d/comm" 2>/dev/null || continue
    # Not the measuring itself: this listing and the channel that runs it.
    case " $self " in *" $pid "*) continue ;; esac
    rss=
    while read -r key value _; do
        [ "$key" = VmRSS: ] && { rss=$value; break; }
    done < "$d/status" 2>/dev/null
    [ -n "$rss" ] || continue
    pss=0
    if [ -r "$d/smaps_rollup" ]; then
        while read -r key value _; do
            [ "$key" = Pss: ] && { pss=$value; break; }
        done < "$d/smaps_rollup"
    fi 2>/dev/null
    w=0
    grep -qa "$marker" "$d/cmdline" 2>/dev/null && w=1
    echo "proc $pid $(printf '%s' "$comm" | tr -c 'A-Za-z0-9_.:-' _) $rss $pss $w"
done
