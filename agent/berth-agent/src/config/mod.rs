//! The node's configuration, merged from three places in a fixed order:
//! `berth/config.yaml` on the ESP (editable from any OS after flashing), then
//! systemd credentials `berth.*` (QEMU passes them by SMBIOS), then the
//! kernel command line `berth.*=`. A later source overrides an earlier one,
//! field by field, so a test or a one-off boot can change one setting.

//!
//! - [`file`]: the three sources, each read into a [`Layer`] of settings
//!   that remembers where each came from;
//! - [`sections`]: the merged layer checked section by section (node, git,
//!   status, drift, network, storage, security) into a [`NodeConfig`];
//! - [`images`]: the `images:` section (registries, pulls, collection).

mod file;
mod images;
mod origin;
mod sections;

use std::path::PathBuf;

pub use file::parse_duration;
use file::{Layer, cmdline_layer, credentials_layer, parse_file};
pub use images::{ImageSettings, RegistrySettings};
use origin::error;
pub use origin::{ConfigError, Origin};
use sections::finish;
pub use sections::{
    DEFAULT_BRANCH, DEFAULT_HEARTBEAT, DEFAULT_HISTORY, DEFAULT_POLL, MIN_HEARTBEAT, MIN_POLL,
    NodeConfig,
};

/// Where to look; `main` builds this from the real paths and the tests from
/// temporary ones.
#[derive(Debug, Clone)]
pub struct ConfigSources {
    pub esp_file: PathBuf,
    /// `$CREDENTIALS_DIRECTORY`, when systemd passed credentials.
    pub credentials_dir: Option<PathBuf>,
    /// The kernel command line (the contents of /proc/cmdline).
    pub kernel_cmdline: String,
    /// Used when no source names the node.
    pub hostname: String,
}

/// Reads every source and merges them. A missing ESP file is not an error in
/// itself (a missing Git URL is); a malformed one is.
pub fn load(sources: &ConfigSources) -> Result<NodeConfig, ConfigError> {
    let mut merged = Layer::default();
    let mut used = Vec::new();
    match std::fs::read_to_string(&sources.esp_file) {
        Ok(text) => {
            merged = merged.over(parse_file(&text, Origin::File(sources.esp_file.clone()))?);
            used.push(sources.esp_file.display().to_string());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(error(
                &Origin::File(sources.esp_file.clone()),
                "(file)",
                format!("cannot read: {e}"),
            ));
        }
    }
    if let Some(dir) = &sources.credentials_dir {
        let layer = credentials_layer(dir)?;
        if layer.1 {
            used.push("systemd credentials".to_string());
        }
        merged = merged.over(layer.0);
    }
    let cmdline = cmdline_layer(&sources.kernel_cmdline)?;
    if cmdline.1 {
        used.push("kernel command line".to_string());
    }
    merged = merged.over(cmdline.0);
    finish(merged, &sources.hostname, used)
}
#[cfg(test)]
mod tests {
    use super::*;
    use berth_plan::podsecurity::Level;
    use std::time::Duration;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("berth-config-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Self(p)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sources(dir: &Dir, cmdline: &str, creds: bool) -> ConfigSources {
        ConfigSources {
            esp_file: dir.0.join("config.yaml"),
            credentials_dir: creds.then(|| dir.0.join("creds")),
            kernel_cmdline: cmdline.to_string(),
            hostname: "fallback-host".into(),
        }
    }

    #[test]
    fn later_sources_override_earlier_ones_field_by_field() {
        let dir = Dir::new("layers");
        dir.write("config.yaml", "node:\n  name: from-esp\n  labels: {zone: a}\ngit:\n  url: https://example.invalid/x.git\n  branch: main\n  pollInterval: 30s\n");
        std::fs::create_dir_all(dir.0.join("creds")).expect("creds dir");
        dir.write("creds/berth.repo", "git://10.0.2.100/desired.git\n");
        dir.write("creds/berth.node", "from-credential");
        let c = load(&sources(
            &dir,
            "quiet berth.branch=staging root=/dev/vda2",
            true,
        ))
        .expect("valid");
        assert_eq!(c.node_name, "from-credential");
        assert_eq!(c.remote.url, "git://10.0.2.100/desired.git");
        assert_eq!(c.remote.branch, "staging");
        assert_eq!(c.poll_interval, Duration::from_secs(30));
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.sources.len(), 3, "{:?}", c.sources);
    }

    #[test]
    fn a_typo_in_the_file_names_the_file_and_the_line() {
        let dir = Dir::new("typo");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\n  brnach: main\n",
        );
        let e = load(&sources(&dir, "", false)).expect_err("typo");
        assert!(e.origin.ends_with("config.yaml"), "{e}");
        assert!(
            e.message.contains("line 3") && e.message.contains("brnach"),
            "{e}"
        );
    }

    #[test]
    fn status_goes_to_the_desired_remote_unless_it_has_its_own() {
        let dir = Dir::new("status-remote");
        let token = dir.write("status-token", "s3cret\n");
        dir.write(
            "config.yaml",
            "git:\n  url: https://git.example/fleet.git\n  credentials: {sshKey: /efi/berth/read-key}\n  knownHosts: /efi/berth/known_hosts\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert!(matches!(
            &c.credentials,
            Some(berth_git::Credentials::SshKey { known_hosts: Some(k), .. }) if k.ends_with("known_hosts")
        ));
        assert_eq!(c.status_url, "https://git.example/fleet.git");
        assert_eq!(c.status_credentials, c.credentials);
        dir.write(
            "config.yaml",
            &format!(
                "git:\n  url: https://git.example/fleet.git\n  credentials: {{sshKey: /efi/berth/read-key}}\nstatus:\n  url: https://git.example/fleet-status.git\n  credentials: {{tokenFile: {}}}\n",
                token.display()
            ),
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.status_url, "https://git.example/fleet-status.git");
        assert!(matches!(
            &c.status_credentials,
            Some(berth_git::Credentials::Token { token, .. }) if token == "s3cret"
        ));
        assert!(matches!(
            c.credentials,
            Some(berth_git::Credentials::SshKey { .. })
        ));
        for (text, field) in [
            ("status:\n  url: not a url\n", "status.url"),
            (
                "status:\n  credentials: {sshKey: /k, tokenFile: /t}\n",
                "status.credentials",
            ),
        ] {
            dir.write(
                "config.yaml",
                &format!("git:\n  url: git://h/r.git\n{text}"),
            );
            let e = load(&sources(&dir, "", false)).expect_err(text);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn image_settings_are_read_and_bad_ones_name_their_field() {
        let dir = Dir::new("images");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nimages:\n  registries:\n    registry.example:\n      mirrors: [\"http://10.0.2.100:5000/\"]\n    \"10.0.2.101:5000\": {insecure: true}\n  pullTimeout: 1m\n  gc: {highThresholdPercent: 90, lowThresholdPercent: 70, minimumAge: 5m, maximumAge: 168h}\nsecurity: {allowPrivileged: true}\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(
            c.images.registries["registry.example"].mirrors,
            ["http://10.0.2.100:5000"]
        );
        assert!(c.images.registries["10.0.2.101:5000"].insecure);
        assert!(!c.images.registries["registry.example"].insecure);
        assert_eq!(c.images.pull_timeout, Duration::from_secs(60));
        assert_eq!(
            (c.images.gc_high_percent, c.images.gc_low_percent),
            (90, 70)
        );
        assert_eq!(
            c.images.gc_maximum_age,
            Some(Duration::from_secs(168 * 3600))
        );
        assert_eq!(c.pod_security, Level::Privileged);
        dir.write("config.yaml", "git:\n  url: git://h/r.git\n");
        let plain = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(plain.images, ImageSettings::default());
        assert_eq!(plain.pod_security, Level::Baseline);
        for (text, level) in [
            ("security: {podSecurity: restricted}", Level::Restricted),
            (
                "security: {podSecurity: privileged, allowPrivileged: true}",
                Level::Privileged,
            ),
            ("security: {allowPrivileged: false}", Level::Baseline),
        ] {
            dir.write(
                "config.yaml",
                &format!("git:\n  url: git://h/r.git\n{text}\n"),
            );
            let c = load(&sources(&dir, "", false)).expect(text);
            assert_eq!(c.pod_security, level, "{text}");
        }
        for (text, field) in [
            ("security: {podSecurity: strict}", "security.podSecurity"),
            (
                "security: {podSecurity: baseline, allowPrivileged: true}",
                "security.allowPrivileged",
            ),
        ] {
            dir.write(
                "config.yaml",
                &format!("git:\n  url: git://h/r.git\n{text}\n"),
            );
            let e = load(&sources(&dir, "", false)).expect_err(text);
            assert_eq!(e.field, field, "{e}");
        }
        for (bad, field) in [
            (
                "images:\n  registries:\n    \"https://r.example\": {}\n",
                "images.registries.https://r.example",
            ),
            (
                "images:\n  registries:\n    r.example: {mirrors: [ftp://m]}\n",
                "images.registries.r.example.mirrors[0]",
            ),
            (
                "images:\n  gc: {highThresholdPercent: 101}\n",
                "images.gc.highThresholdPercent",
            ),
            (
                "images:\n  gc: {highThresholdPercent: 50, lowThresholdPercent: 60}\n",
                "images.gc.lowThresholdPercent",
            ),
            ("images:\n  pullTimeout: soon\n", "images.pullTimeout"),
            ("images:\n  pullTimout: 1m\n", "pullTimout"),
        ] {
            dir.write("config.yaml", &format!("git:\n  url: git://h/r.git\n{bad}"));
            let e = load(&sources(&dir, "", false)).expect_err(bad);
            assert!(e.to_string().contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn host_path_prefixes_are_absolute_directories_and_never_the_root() {
        let dir = Dir::new("storage");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nstorage:\n  hostPathPrefixes: [/srv/, /data]\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.host_path_prefixes, ["/srv", "/data"]);
        for (bad, says) in [
            ("[srv]", "absolute"),
            ("[/]", "whole node"),
            ("[/srv/../etc]", "'..'"),
        ] {
            dir.write(
                "config.yaml",
                &format!("git:\n  url: git://h/r.git\nstorage:\n  hostPathPrefixes: {bad}\n"),
            );
            let e = load(&sources(&dir, "", false)).expect_err(bad);
            assert_eq!(e.field, "storage.hostPathPrefixes", "{e}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn network_settings_come_from_the_file_and_a_bad_one_names_file_and_field() {
        let dir = Dir::new("network");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nnetwork:\n  podCIDR: 172.30.0.0/16\n  serviceCIDR: 172.31.0.0/16\n  clusterDomain: example.internal\n  nodePortRange: 31000-31999\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.network.pod_cidr.to_string(), "172.30.0.0/16");
        assert_eq!(c.network.service_cidr.to_string(), "172.31.0.0/16");
        assert_eq!(c.network.cluster_domain, "example.internal");
        assert_eq!(c.network.node_ports, (31000, 31999));
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nnetwork:\n  podCIDR: 10.96.0.0/16\n",
        );
        let e = load(&sources(&dir, "", false)).expect_err("overlap");
        assert!(e.origin.ends_with("config.yaml"), "{e}");
        assert_eq!(e.field, "network.serviceCIDR");
        assert!(
            e.message.contains("overlaps the pod range 10.96.0.0/16"),
            "{e}"
        );
    }

    #[test]
    fn no_git_url_anywhere_is_a_clear_error() {
        let dir = Dir::new("nourl");
        let e = load(&sources(&dir, "", false)).expect_err("no url");
        assert_eq!(e.field, "git.url");
        assert!(e.message.contains("berth/config.yaml on the ESP"), "{e}");
    }

    #[test]
    fn the_boot_entrys_slot_and_the_initrds_switch_are_not_settings() {
        let dir = Dir::new("bootparams");
        let c = load(&sources(
            &dir,
            "root=PARTUUID=x berth.slot=b ro berth.initrd=shell berth.repo=git://h/r",
            false,
        ))
        .expect("loads");
        assert_eq!(c.remote.url, "git://h/r");
    }

    #[test]
    fn bad_values_are_refused_with_their_source() {
        let dir = Dir::new("bad");
        for (cmdline, field) in [
            ("berth.repo=git://h/r berth.branch=a..b", "git.branch"),
            ("berth.repo=git://h/r berth.poll=1s", "git.pollInterval"),
            ("berth.repo=git://h/r berth.poll=soon", "git.pollInterval"),
            ("berth.repo=git://h/r berth.path=../etc", "git.path"),
            ("berth.repo=not-a-url", "git.url"),
            ("berth.repo=git://h/r berth.node=Bad_Name", "node.name"),
            ("berth.repo=git://h/r berth.labels=novalue", "labels"),
            ("berth.repo=git://h/r berth.colour=red", "colour"),
            (
                "berth.repo=git://h/r berth.pod-cidr=10.88.0.0/33",
                "network.podCIDR",
            ),
            (
                "berth.repo=git://h/r berth.service-cidr=10.88.0.0/24",
                "network.serviceCIDR",
            ),
            (
                "berth.repo=git://h/r berth.node-port-range=80",
                "network.nodePortRange",
            ),
            (
                "berth.repo=git://h/r berth.drift-policy=maybe",
                "drift.policy",
            ),
            (
                "berth.repo=git://h/r berth.heartbeat=1s",
                "status.heartbeat",
            ),
            (
                "berth.repo=git://h/r berth.heartbeat=often",
                "status.heartbeat",
            ),
            ("berth.repo=git://h/r berth.history=1", "status.history"),
            (
                "berth.repo=git://h/r berth.publish=perhaps",
                "status.publish",
            ),
            (
                "berth.repo=git://h/r berth.restart-threshold=-1",
                "drift.restartThreshold",
            ),
            (
                "berth.repo=git://h/r berth.drift-ignore=Memory.Max",
                "drift.ignore",
            ),
        ] {
            let e = load(&sources(&dir, cmdline, false)).expect_err(cmdline);
            assert_eq!(e.field, field, "{cmdline}: {e}");
            assert_eq!(e.origin, "kernel command line", "{cmdline}: {e}");
        }
    }

    #[test]
    fn eviction_thresholds_are_read_and_a_wrong_one_names_its_field() {
        use berth_plan::pressure::{Amount, Signal};
        let dir = Dir::new("eviction");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r\neviction:\n  hard: {memory.available: 300Mi, nodefs.available: 5%}\n  soft: {memory.available: 500Mi}\n  softGracePeriod: {memory.available: 30s}\n  minimumReclaim: {memory.available: 64Mi}\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        let e = &c.eviction;
        assert_eq!(
            e.hard[&Signal::MemoryAvailable],
            Amount::Quantity(300 << 20)
        );
        assert_eq!(e.hard[&Signal::NodefsAvailable], Amount::Percent(500));
        assert_eq!(
            e.soft[&Signal::MemoryAvailable],
            Amount::Quantity(500 << 20)
        );
        assert_eq!(e.soft_grace_seconds[&Signal::MemoryAvailable], 30);
        assert_eq!(
            e.minimum_reclaim[&Signal::MemoryAvailable],
            Amount::Quantity(64 << 20)
        );
        // Absent: the kubelet's defaults.
        dir.write("config.yaml", "git:\n  url: git://h/r\n");
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.eviction, berth_plan::pressure::Thresholds::default());
        for (eviction, field) in [
            (
                "hard: {memory.available: lots}",
                "eviction.hard.memory.available",
            ),
            (
                "hard: {nodefs.available: 120%}",
                "eviction.hard.nodefs.available",
            ),
            ("hard: {memory.free: 1Gi}", "eviction.hard.memory.free"),
            (
                "soft: {memory.available: 1Gi}",
                "eviction.softGracePeriod.memory.available",
            ),
            (
                "softGracePeriod: {memory.available: 30s}",
                "eviction.softGracePeriod.memory.available",
            ),
            (
                "soft: {memory.available: 1Gi}\n  softGracePeriod: {memory.available: soon}",
                "eviction.softGracePeriod.memory.available",
            ),
            (
                "minimumReclaim: {pid.available: x}",
                "eviction.minimumReclaim.pid.available",
            ),
        ] {
            let path = dir.write(
                "config.yaml",
                &format!("git:\n  url: git://h/r\neviction:\n  {eviction}\n"),
            );
            let e = load(&sources(&dir, "", false)).expect_err(eviction);
            assert_eq!(e.field, field, "{eviction}: {e}");
            assert!(e.origin.contains(&path.display().to_string()), "{e}");
        }
    }

    #[test]
    fn the_metrics_endpoint_is_off_unless_listen_is_given_and_a_wrong_one_names_its_field() {
        let dir = Dir::new("metrics");
        dir.write("config.yaml", "git:\n  url: git://h/r\n");
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.metrics, crate::metrics::MetricsSettings::default());
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r\nmetrics:\n  listen: 0.0.0.0:9100\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.metrics.listen.map(|a| a.port()), Some(9100));
        assert!(!c.metrics.allow_pods);
        assert_eq!(c.metrics.closed_to_pods(), Some(9100));
        for (metrics, field) in [
            ("listen: 9100", "metrics.listen"),
            ("listen: 10.0.0.1", "metrics.listen"),
            ("listen: 0.0.0.0:0", "metrics.listen"),
            ("allowPods: maybe", "(file)"),
            ("port: 9100", "(file)"),
        ] {
            let path = dir.write(
                "config.yaml",
                &format!("git:\n  url: git://h/r\nmetrics:\n  {metrics}\n"),
            );
            let e = load(&sources(&dir, "", false)).expect_err(metrics);
            assert_eq!(e.field, field, "{metrics}: {e}");
            assert!(e.origin.contains(&path.display().to_string()), "{e}");
            if field == "(file)" {
                // The YAML reader's error, with the line of the field.
                assert!(e.message.contains("line 4"), "{e}");
            }
        }
    }

    #[test]
    fn status_and_drift_settings_are_read_with_their_defaults() {
        let dir = Dir::new("drift");
        let file = dir.write(
            "config.yaml",
            "git:\n  url: git://h/r\n  allowedSigners: /efi/berth/allowed\nstatus:\n  heartbeat: 2m\n  history: 20\n  pushOptions: [merge_request.create]\ndrift:\n  policy: report\n  restartThreshold: 3\n  ignore: [MemoryHigh, state]\n",
        );
        let mut src = sources(&dir, "", false);
        src.esp_file = file;
        let c = load(&src).expect("valid");
        assert_eq!(c.heartbeat, Duration::from_secs(120));
        assert_eq!(c.history, 20);
        assert_eq!(c.push_options, vec!["merge_request.create".to_string()]);
        assert_eq!(c.drift.policy, crate::drift::Policy::Report);
        assert_eq!(c.drift.restart_threshold, 3);
        assert!(c.drift.ignore.contains("MemoryHigh") && c.drift.ignore.contains("state"));
        assert_eq!(c.allowed_signers, Some(PathBuf::from("/efi/berth/allowed")));
        assert!(c.publish);
        std::fs::remove_file(&src.esp_file).expect("remove");
        let d = load(&sources(&dir, "berth.repo=git://h/r", false)).expect("valid");
        assert_eq!(
            (
                d.heartbeat,
                d.history,
                d.drift.policy,
                d.drift.restart_threshold
            ),
            (
                DEFAULT_HEARTBEAT,
                DEFAULT_HISTORY,
                crate::drift::Policy::Heal,
                5
            )
        );
        let e = {
            dir.write(
                "config.yaml",
                "git:\n  url: git://h/r\ndrift:\n  polcy: heal\n",
            );
            load(&src).expect_err("typo")
        };
        assert!(e.message.contains("polcy"), "{e}");
    }

    #[test]
    fn the_hostname_names_the_node_when_nothing_else_does() {
        let dir = Dir::new("host");
        let c = load(&sources(&dir, "berth.repo=/srv/git/desired.git", false)).expect("valid");
        assert_eq!(c.node_name, "fallback-host");
        assert_eq!(c.remote.branch, "main");
        assert_eq!(c.poll_interval, DEFAULT_POLL);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("m"), None);
    }
}
