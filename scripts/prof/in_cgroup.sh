#!/bin/bash
# in_cgroup.sh CAP_BYTES cmd...: run cmd in a fresh v1 memory cgroup limited to CAP_BYTES (root; the page cache
# is dropped first), then print the cgroup's peak usage (page cache included) on stderr
set -u
cap=$1; shift
cg=/sys/fs/cgroup/memory/nlprof.$$
mkdir "$cg" && echo "$cap" > "$cg/memory.limit_in_bytes" || exit 1
sync; echo 3 > /proc/sys/vm/drop_caches
bash -c "echo \$\$ > $cg/cgroup.procs; exec \"\$@\"" _ "$@"
rc=$?
echo "peak $(( $(cat "$cg/memory.max_usage_in_bytes") >> 20 )) MiB" >&2
rmdir "$cg"
exit $rc
