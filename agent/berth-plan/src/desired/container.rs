//! One container of a pod as a systemd service: first the container
//! checks (what to run, where, as whom, isolated how), then the unit's
//! properties from what they found. Its environment is resolved in
//! [`super::environment`].

use std::sync::Arc;

use berth_manifest::{FieldIssue, FieldPath};

use super::environment::{Env, environment};
use super::input::ContainerInput;
use super::model::{
    ContainerUnit, DEFAULT_GRACE_SECONDS, DEFAULT_PATH, PullPolicy, RESTART_INITIAL_USEC,
    RESTART_MAX_USEC, RESTART_STEPS, Resizable, RestartPolicy,
};
use crate::context::Context;
use crate::expand::expand;
use crate::resources::{self, QosClass};
use crate::units::{
    self, CONTAINER_FIELD, ExecCommand, IMAGE_FIELD, MARKER_FIELD, OWNER_FIELD, POD_FIELD,
    Properties, PropertyValue, UnitName,
};
use crate::volumes::SubPathBind;

use super::model::EnvironmentFile;

/// What the checks of a container found: what its unit is made of.
struct Checked {
    name: UnitName,
    image_ref: String,
    env: Env,
    argv: Option<Vec<String>>,
    /// `argv` as plans show it, when a secret went into it.
    argv_shown: Option<Vec<String>>,
    working_dir: Option<String>,
    uid: Option<i64>,
    gid: Option<i64>,
    verify_non_root: bool,
    /// Capabilities, seccomp and the rest, from the security context.
    isolation: Properties,
    /// The seccomp profile's name, for the journal field.
    seccomp: &'static str,
}

/// One container as a service unit: checked, then its properties.
pub(super) fn container_unit(
    input: &ContainerInput<'_>,
    ctx: &Context<'_>,
    warnings: &mut Vec<FieldIssue>,
) -> Result<ContainerUnit, Vec<FieldIssue>> {
    let checked = check(input, ctx, warnings)?;
    let (p, sub_paths, environment_file) = properties(input, ctx, &checked);
    let c = input.container;
    let policy_for = |resource: &str| {
        c.resize_policy
            .iter()
            .flatten()
            .find(|r| r.resource_name == resource)
            .map_or("NotRequired", |r| r.restart_policy.as_str())
    };
    let resizable = Resizable {
        cpu: policy_for("cpu") == "NotRequired",
        memory: policy_for("memory") == "NotRequired",
    };
    let pull_policy = PullPolicy::resolve(c.image_pull_policy.as_deref(), &checked.image_ref);
    Ok(ContainerUnit {
        name: checked.name,
        container: c.name.clone(),
        init: input.is_init,
        image: checked.image_ref,
        properties: Arc::new(p),
        exec_shown: checked.argv_shown,
        sensitive_env: checked.env.sensitive,
        environment_file,
        resizable,
        sub_paths,
        pull_policy,
        verify_non_root: checked.verify_non_root,
        probes: c.probes.clone(),
        hooks: c.hooks.clone(),
        grace_seconds: grace_seconds(input),
    })
}

/// The container checks: what to run (the command merged with the image's
/// Entrypoint and Cmd, `$(VAR)` expanded), where, as whom, and isolated
/// how; every problem with its field.
fn check(
    input: &ContainerInput<'_>,
    ctx: &Context<'_>,
    warnings: &mut Vec<FieldIssue>,
) -> Result<Checked, Vec<FieldIssue>> {
    let c = input.container;
    let path = input.path;
    let id = &input.instance.id;
    let mut errors = Vec::new();
    let image_ref = c.image.clone().unwrap_or_default();
    let image = ctx.images.get(&image_ref);
    let name = match units::container_service(id, &c.name) {
        Ok(n) => n,
        Err(e) => return Err(vec![FieldIssue::error(path.key("name"), e.to_string())]),
    };

    let env = environment(input, image, ctx, &mut errors, warnings);
    // The command merged with the image's Entrypoint and Cmd as Kubernetes
    // does, each written argument `$(VAR)`-expanded by `expand_arg`.
    let command_line = |expand_arg: &dyn Fn(&str) -> String| -> Option<Vec<String>> {
        let expanded = |v: &Option<Vec<String>>| {
            v.as_ref()
                .filter(|v| !v.is_empty())
                .map(|v| v.iter().map(|a| expand_arg(a)).collect::<Vec<String>>())
        };
        match (expanded(&c.command), expanded(&c.args), image) {
            (Some(cmd), Some(args), _) => Some(cmd.into_iter().chain(args).collect()),
            (Some(cmd), None, _) => Some(cmd),
            (None, Some(args), Some(img)) => {
                Some(img.entrypoint.iter().cloned().chain(args).collect())
            }
            (None, None, Some(img)) => Some(
                img.entrypoint
                    .iter()
                    .chain(img.cmd.iter())
                    .cloned()
                    .collect(),
            ),
            (None, _, None) => None,
        }
    };
    let argv = command_line(&|a| expand(a, |n| env.get(n)));
    // As plans, logs and status show it: a `$(VAR)` of a secret stays a
    // placeholder there (the unit itself gets the value).
    let shown = if env.sensitive.is_empty() {
        None
    } else {
        command_line(&|a| env.expand_shown(a))
    };
    match &argv {
        Some(v) if v.is_empty() => errors.push(FieldIssue::error(
            path.key("command"),
            format!("nothing to run: the container sets no command and image {image_ref:?} has neither Entrypoint nor Cmd"),
        )),
        Some(v) if v[0].is_empty() => errors.push(FieldIssue::error(path.key("command"), "the program to run is an empty string")),
        None => warnings.push(FieldIssue::warning(
            path.key("command"),
            format!("the command comes from image {image_ref:?}, which this plan does not know (pass --images); it is resolved when the image is present"),
        )),
        _ => {}
    }

    let working_dir = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| image.and_then(|i| i.working_dir.clone()));
    if let Some(dir) = &working_dir
        && !dir.starts_with('/')
    {
        errors.push(FieldIssue::error(
            path.key("workingDir"),
            format!("{dir:?} must be an absolute path"),
        ));
    }

    let pod_sc = input.instance.spec.security_context.as_deref();
    let sc = c.security_context.as_deref();
    let (image_uid, image_gid) = image
        .and_then(|i| i.user.as_deref())
        .map(parse_image_user)
        .unwrap_or((None, None));
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user))
        .or(image_uid);
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group))
        .or(image_gid);
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    let explicit_uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    // The kubelet's rule: a uid written in the manifest is checked now; one
    // left to the image is checked when the container starts, and a root
    // image then shows CreateContainerConfigError on the pod.
    if non_root && explicit_uid == Some(0) {
        errors.push(FieldIssue::error(
            path.key("securityContext").key("runAsNonRoot"),
            "runAsNonRoot is set but runAsUser is 0 (root)",
        ));
    }
    if uid == Some(crate::node::VAR_RESERVE_UID) {
        errors.push(FieldIssue::error(
            if explicit_uid.is_some() {
                path.key("securityContext").key("runAsUser")
            } else {
                path.key("image")
            },
            format!(
                "uid {} owns the root reserve of the node's /var (what keeps Git, status and claims working on a full disk); containers may not run as it",
                crate::node::VAR_RESERVE_UID
            ),
        ));
    }
    let verify_non_root = non_root && explicit_uid.is_none();
    if let Some(sc) = sc {
        crate::security::check_combination(sc, &path.key("securityContext"), &mut errors);
    }
    let mut isolation = Properties::new();
    let seccomp = crate::security::isolate(
        &crate::security::Input {
            pod: pod_sc,
            pod_path: &FieldPath::parse(input.instance.spec_path),
            container: sc,
            path,
        },
        &mut isolation,
        &mut errors,
    );
    if image.is_some_and(|i| {
        i.user
            .as_deref()
            .is_some_and(|u| parse_image_user(u).0.is_none() && !u.is_empty())
    }) && uid.is_none()
    {
        warnings.push(FieldIssue::warning(path.key("securityContext").key("runAsUser"), "the image names its user by name; it is resolved from the image's /etc/passwd at start"));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let argv_shown = shown.filter(|s| argv.as_ref().is_some_and(|a| a != s));
    Ok(Checked {
        name,
        image_ref,
        env,
        argv,
        argv_shown,
        working_dir,
        uid,
        gid,
        verify_non_root,
        isolation,
        seccomp,
    })
}

/// The unit properties of a checked container: identity and log fields,
/// the command, environment and user, restart policy, resources, its root,
/// namespaces, isolation and volumes; minus what the node's systemd is too
/// old for. Returns them with the container's staged `subPath` binds and
/// the file that carries its secret environment, if it has one.
fn properties(
    input: &ContainerInput<'_>,
    ctx: &Context<'_>,
    checked: &Checked,
) -> (Properties, Vec<SubPathBind>, Option<EnvironmentFile>) {
    let c = input.container;
    let id = &input.instance.id;
    let Checked {
        image_ref,
        env,
        argv,
        working_dir,
        uid,
        gid,
        isolation,
        seccomp,
        ..
    } = checked;
    let version = ctx.node.systemd_version;
    let mut p = Properties::on(ctx.shared_properties(common(input, isolation, version)));
    let u = PropertyValue::Unsigned;
    p.insert(
        "Description",
        PropertyValue::text(format!(
            "berth {}container {} of pod {}",
            if input.is_init { "init " } else { "" },
            c.name,
            id
        )),
    );
    p.insert("Slice", PropertyValue::text(input.slice.as_str()));
    let mut fields = vec![
        MARKER_FIELD.to_string(),
        format!("{POD_FIELD}={id}"),
        format!("{CONTAINER_FIELD}={}", c.name),
        format!("{IMAGE_FIELD}={image_ref}"),
        format!("{}={seccomp}", crate::security::SECCOMP_FIELD),
    ];
    if let Some(owner) = &input.instance.owner {
        fields.push(format!("{OWNER_FIELD}={owner}"));
    }
    p.insert("LogExtraFields", PropertyValue::list(fields));
    if let Some(argv) = argv {
        p.insert(
            "ExecStart",
            PropertyValue::Exec(Arc::new([ExecCommand {
                path: argv[0].clone(),
                argv: argv.clone(),
            }])),
        );
    }
    // postStart: systemd runs it in the unit's own sandbox (the
    // container's root, namespaces, user and environment) once the main
    // process runs; the container is not active until it ends, and its
    // failure fails the start, so the restart policy restarts it: the
    // kubelet's semantics for an exec hook.
    if let Some(berth_manifest::probe::Action::Exec { command }) = c.hooks.post_start.as_deref()
        && let Some(program) = command.first()
    {
        p.insert(
            "ExecStartPost",
            PropertyValue::Exec(Arc::new([ExecCommand {
                path: program.clone(),
                argv: command.clone(),
            }])),
        );
    }
    // Values from Secrets go in a root-only file systemd reads at start
    // (`EnvironmentFile=`), not in `Environment=`, which any local user
    // may read over D-Bus and in /run/systemd/transient.
    let (secret, plain): (Vec<_>, Vec<_>) = env
        .entries
        .iter()
        .partition(|(k, _)| env.sensitive.contains_key(k));
    p.insert(
        "Environment",
        PropertyValue::list(
            plain
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        ),
    );
    let environment_file = (!secret.is_empty()).then(|| {
        let dir = format!(
            "{}/{}_{}",
            ctx.node.containers_dir.trim_end_matches('/'),
            id.key(),
            c.name
        );
        EnvironmentFile::new(&dir, &secret)
    });
    if let Some(f) = &environment_file {
        p.insert("EnvironmentFiles", PropertyValue::list([f.path.clone()]));
    }
    if let Some(dir) = working_dir {
        p.insert("WorkingDirectory", PropertyValue::text(dir.as_str()));
    }
    if let Some(uid) = uid {
        p.insert("User", PropertyValue::text(uid.to_string()));
    }
    if let Some(gid) = gid {
        p.insert("Group", PropertyValue::text(gid.to_string()));
    }
    if !input.after.is_empty() {
        let after = PropertyValue::list(input.after.as_slice());
        p.insert("After", after.clone());
        p.insert("Requires", after);
    }
    p.insert("TimeoutStopUSec", u(grace_seconds(input) * 1_000_000));

    let res = input.resources;
    let shares = resources::milli_to_shares(res.cpu_request_milli.unwrap_or(0));
    p.insert("CPUWeight", u(resources::shares_to_weight(shares)));
    if let Some(limit) = res.cpu_limit_milli {
        p.insert(
            "CPUQuotaPerSecUSec",
            u(resources::quota_per_sec(resources::milli_to_quota(limit))),
        );
        p.insert("CPUQuotaPeriodUSec", u(resources::CPU_PERIOD_USEC));
    }
    if let Some(limit) = res.memory_limit_bytes {
        p.insert("MemoryMax", u(limit));
    }
    if let Some(request) = res.memory_request_bytes {
        p.insert("MemoryLow", u(request));
    }
    if input.qos != QosClass::Guaranteed
        && let Some(high) = resources::memory_high(
            res.memory_request_bytes.unwrap_or(0),
            res.memory_limit_bytes,
            ctx.node.memory_bytes,
        )
    {
        p.insert("MemoryHigh", u(high));
    }
    p.insert(
        "OOMScoreAdjust",
        PropertyValue::Signed(i64::from(resources::oom_score_adj(
            input.qos,
            res.memory_request_bytes.unwrap_or(0),
            ctx.node.memory_bytes,
        ))),
    );

    // The container's own root: an overlay of its image, mounted by the
    // runtime at this path before the service starts.
    let rootfs = format!(
        "{}/{}_{}/rootfs",
        ctx.node.containers_dir.trim_end_matches('/'),
        id.key(),
        c.name
    );
    p.insert("RootDirectory", PropertyValue::text(rootfs.as_str()));
    p.insert("RequiresMountsFor", PropertyValue::list([rootfs]));
    // The pod's own network namespace, made and wired by the agent before
    // the container starts.
    if let Some(dir) = &ctx.node.netns_dir
        && input.instance.spec.host_network != Some(true)
    {
        p.insert(
            "NetworkNamespacePath",
            PropertyValue::text(format!("{}/{}", dir.trim_end_matches('/'), id.key())),
        );
    }
    let (rw, ro, sub_paths) =
        crate::volumes::container_binds(id, c, input.volumes, &ctx.node.volumes);
    if !rw.is_empty() {
        p.insert("BindPaths", PropertyValue::Binds(rw.into()));
    }
    if !ro.is_empty() {
        p.insert("BindReadOnlyPaths", PropertyValue::Binds(ro.into()));
    }
    // A bare program name is looked up in the container's PATH, inside its root.
    if let Some(path) = env.get("PATH") {
        p.insert("ExecSearchPath", search_path(&path));
    }
    p.retain(|k| units::introduced_in(k).is_none_or(|v| v <= version));
    p.shrink_to_fit();
    (p, sub_paths, environment_file)
}

/// The pod's `terminationGracePeriodSeconds`, defaulted.
fn grace_seconds(input: &ContainerInput<'_>) -> u64 {
    input
        .instance
        .spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_SECONDS)
        .max(0) as u64
}

/// The properties a container shares with every other of the same kind
/// (init or not), restart policy and isolation: how it runs and restarts,
/// its sandbox, minus what the node's systemd is too old for.
fn common(input: &ContainerInput<'_>, isolation: &Properties, version: u32) -> Properties {
    let mut p = Properties::new();
    let u = PropertyValue::Unsigned;
    if input.is_init {
        p.insert("Type", PropertyValue::text("oneshot"));
        p.insert("RemainAfterExit", PropertyValue::Bool(true));
    } else {
        p.insert("Type", PropertyValue::text("exec"));
    }
    let restart = match (input.is_init, input.restart_policy) {
        (_, RestartPolicy::Never) => "no",
        (true, _) | (false, RestartPolicy::OnFailure) => "on-failure",
        (false, RestartPolicy::Always) => "always",
    };
    p.insert("Restart", PropertyValue::text(restart));
    if restart != "no" {
        p.insert("RestartUSec", u(RESTART_INITIAL_USEC));
        p.insert("RestartMaxDelayUSec", u(RESTART_MAX_USEC));
        p.insert("RestartSteps", u(RESTART_STEPS));
        // Kubernetes never gives up restarting; neither may systemd's start limit.
        p.insert("StartLimitIntervalUSec", u(0));
    }
    if !input.is_init && input.restart_policy != RestartPolicy::Always {
        // A container that ran to completion stays visible as exited, so it
        // is not mistaken for a missing one and started again.
        p.insert("RemainAfterExit", PropertyValue::Bool(true));
    }
    p.insert("MountAPIVFS", PropertyValue::Bool(true));
    p.insert("PrivateTmp", PropertyValue::Bool(true));
    p.insert("PrivatePIDs", PropertyValue::Bool(true));
    p.extend_from(isolation);
    p.retain(|k| units::introduced_in(k).is_none_or(|v| v <= version));
    p
}

/// `ExecSearchPath` from a `PATH`: its absolute directories. Nearly every
/// container has the default `PATH`, whose list all units share.
fn search_path(path: &str) -> PropertyValue {
    static DEFAULT: std::sync::LazyLock<PropertyValue> =
        std::sync::LazyLock::new(|| directories(DEFAULT_PATH));
    fn directories(path: &str) -> PropertyValue {
        PropertyValue::list(
            path.split(':')
                .filter(|d| d.starts_with('/'))
                .map(str::to_string)
                .collect::<Vec<_>>(),
        )
    }
    if path == DEFAULT_PATH {
        DEFAULT.clone()
    } else {
        directories(path)
    }
}

fn parse_image_user(user: &str) -> (Option<i64>, Option<i64>) {
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    (u.parse().ok(), g.and_then(|g| g.parse().ok()))
}
