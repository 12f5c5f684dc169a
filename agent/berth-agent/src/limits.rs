//! The resource-control files of Berth's cgroups: what `systemctl
//! set-property` writes and PID 1 does not signal. An idle poll reads them
//! again instead of observing every unit over D-Bus.

/// Resource-control files of Berth's cgroups, by cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct CgroupLimits(std::collections::BTreeMap<String, Vec<String>>);

/// What `SetUnitProperties` can change on a running unit shows up here.
const LIMIT_FILES: [&str; 6] = [
    "memory.max",
    "memory.low",
    "memory.high",
    "cpu.max",
    "cpu.weight",
    "pids.max",
];

impl CgroupLimits {
    pub(crate) fn read<'a>(root: &std::path::Path, groups: impl Iterator<Item = &'a str>) -> Self {
        let mut out = std::collections::BTreeMap::new();
        for group in groups.filter(|g| !g.is_empty()) {
            let dir = root.join(group.trim_start_matches('/'));
            let values = LIMIT_FILES
                .iter()
                .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
                .collect();
            out.insert(group.to_string(), values);
        }
        Self(out)
    }

    pub(crate) fn reread(&self, root: &std::path::Path) -> Self {
        Self::read(root, self.0.keys().map(String::as_str))
    }
}
