#!/bin/sh
# Runs in the guest (bench_sandbox): how long systemd takes to start a
# transient Type=exec service with each of a container's sandbox settings,
# alone and all together. Needs one running Berth container to borrow its
# root and network namespace from. Prints "sandbox: <label> <ms>" lines.
# SET=quick times only the settings that walk the mount table, and all of
# them together (for a node that already runs many pods).
set -u
runs=${RUNS:-3}
unit=$(systemctl list-units --plain --no-legend 'berth-default_*_main.service' | awk '{print $1; exit}')
[ -n "$unit" ] || { echo "sandbox: no running container to borrow from"; exit 1; }
root=$(systemctl show -p RootDirectory --value "$unit")
netns=$(systemctl show -p NetworkNamespacePath --value "$unit")
file=/run/systemd/transient/$unit
filter=$(sed -n 's/^SystemCallFilter=//p' "$file" | head -n1)
caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$file" | head -n1)

ms_now() { date +%s%N | cut -c1-13; }

# What the emulated CPU costs before systemd does anything: an exec of a
# static binary, and of systemd's executor (which every unit start runs).
execs() {
    label=$1; shift
    s=$(ms_now)
    for _ in 1 2 3 4 5 6 7 8 9 10; do "$@" >/dev/null 2>&1; done
    e=$(ms_now)
    echo "sandbox: exec of $label $(( (e - s) / 10 )) ms"
}
execs "busybox true (static)" busybox true
execs "systemd-executor --version" /usr/lib/systemd/systemd-executor --version
execs "systemctl --version" systemctl --version
echo "sandbox: mounts in PID 1's namespace: $(wc -l < /proc/1/mountinfo)"
grep . /sys/devices/system/cpu/vulnerabilities/* | sed 's|.*/||; s/^/sandbox: vulnerability /'

measure() {
    label=$1; shift
    total=0; worst=0
    for i in $(seq "$runs"); do
        s=$(ms_now)
        systemd-run -q --unit="berth-sbx-$i" -p Type=exec "$@" /bin/sleep 1000 || echo "sandbox: $label FAILED"
        e=$(ms_now)
        systemctl stop "berth-sbx-$i"; systemctl reset-failed "berth-sbx-$i" 2>/dev/null
        d=$((e - s)); total=$((total + d)); [ "$d" -gt "$worst" ] && worst=$d
    done
    echo "sandbox: $label $((total / runs)) ms (worst $worst)"
}

R="-p RootDirectory=$root"
measure "nothing (host root)"
measure "RootDirectory" $R
measure "root+PrivateDevices" $R -p PrivateDevices=yes
measure "root+ProtectKernelTunables" $R -p ProtectKernelTunables=yes
if [ "${SET:-all}" != quick ]; then
measure "root+MountAPIVFS" $R -p MountAPIVFS=yes
measure "root+PrivateTmp" $R -p PrivateTmp=yes
measure "root+ProtectKernelModules" $R -p ProtectKernelModules=yes
measure "root+ProtectKernelLogs" $R -p ProtectKernelLogs=yes
measure "root+ProtectControlGroups" $R -p ProtectControlGroups=yes
measure "root+NoNewPrivileges" $R -p NoNewPrivileges=yes
measure "root+CapabilityBoundingSet" $R -p "CapabilityBoundingSet=$caps"
measure "root+SystemCallFilter" $R -p "SystemCallFilter=$filter" -p SystemCallArchitectures=native -p SystemCallErrorNumber=EPERM
measure "root+RestrictNamespaces" $R -p RestrictNamespaces=yes
measure "root+NetworkNamespacePath" $R -p NetworkNamespacePath="$netns"
measure "root+PrivatePIDs" $R -p PrivatePIDs=yes
fi
# Runs "$1" (measure or burst) labelled "$2" with the container's
# settings but seccomp and PrivatePIDs, and the rest of the arguments.
sandboxed() {
    run=$1; label=$2; shift 2
    "$run" "$label" $R -p MountAPIVFS=yes -p PrivateTmp=yes -p PrivateDevices=yes \
        -p ProtectKernelTunables=yes -p ProtectKernelModules=yes -p ProtectKernelLogs=yes \
        -p ProtectControlGroups=yes -p NoNewPrivileges=yes -p "CapabilityBoundingSet=$caps" \
        -p NetworkNamespacePath="$netns" "$@"
}
seccomp() {
    run=$1; label=$2; shift 2
    sandboxed "$run" "$label" -p "SystemCallFilter=$filter" -p SystemCallArchitectures=native \
        -p SystemCallErrorNumber=EPERM -p RestrictNamespaces=yes "$@"
}
sandboxed measure "all but seccomp" -p PrivatePIDs=yes
seccomp measure "all" -p PrivatePIDs=yes
[ "${SET:-all}" = quick ] && exit 0
# The same sets, ten units at once (queued with --no-block, then waited
# for): what a pod burst costs, where units compete for the two vCPUs and
# the kernel's mount and namespace locks.
burst() {
    label=$1; shift
    s=$(ms_now)
    for i in 0 1 2 3 4 5 6 7 8 9; do
        systemd-run -q --no-block --unit="berth-sbx-burst-$i" -p Type=exec "$@" /bin/sleep 1000 || echo "sandbox: $label FAILED"
    done
    queued=$(ms_now)
    # Active, or failed (a setting this systemd refuses): settled either way.
    tries=0
    while [ "$(systemctl list-units --plain --no-legend --state=active,failed 'berth-sbx-burst-*' | wc -l)" -lt 10 ] && [ $tries -lt 600 ]; do
        sleep 0.1; tries=$((tries + 1))
    done
    e=$(ms_now)
    failed=$(systemctl list-units --plain --no-legend --state=failed 'berth-sbx-burst-*' | wc -l)
    [ "$failed" -eq 0 ] || echo "sandbox: burst $label: $failed of 10 failed"
    systemctl stop 'berth-sbx-burst-*'
    systemctl reset-failed 'berth-sbx-burst-*' 2>/dev/null
    echo "sandbox: burst of 10, $label: $((e - s)) ms ($((queued - s)) ms to queue)"
}
burst "nothing (host root)"
burst "RootDirectory" $R
sandboxed burst "all but seccomp" -p PrivatePIDs=yes
seccomp burst "all" -p PrivatePIDs=yes
seccomp burst "all but PrivatePIDs"
echo "sandbox: unit file of $unit:"
sed 's/^/sandbox:   /' "$file"
