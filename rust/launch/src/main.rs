//! `synapse-launch`: the small native program between a Synapse worker and a task.
//!
//! `synapse-launch launch SPEC_FD REPORT_FD` is the worker's child for one task. It forks the
//! task's first process, which — before it execs the task's command — starts its own session
//! (so the task has its own process group), joins the task's cgroups, sets the rlimits, drops
//! to the task uid and restores the default signal dispositions. The launcher stays outside
//! all of that: it waits for the task, reaps the task's orphans (it is their child subreaper),
//! kills what is left of the task's process group when its first process ends or when the
//! supervisor sends it SIGTERM, and reports on REPORT_FD one line:
//!
//! ```text
//! spawn_error <why>                                  the command could not be started
//! exit <wait status> <user s> <sys s> <max RSS KiB>  the task's end, and its rusage
//! ```
//!
//! `synapse-launch init REPORT_FD ARGV...` is pid 1 of a bubblewrap sandbox's pid namespace
//! (`bwrap --as-pid-1`): it starts the command, reaps every orphan, and reports `status
//! <wait status>` of the command itself (bwrap waits for an --as-pid-1 child, so its rusage
//! covers the whole task).
//!
//! Why native: the worker starts one of these (two under bubblewrap) per task. As Python
//! programs they cost ~25 ms of CPU each on the development machine, which capped a 2-core
//! machine at ~40 trivial sandboxed tasks per second; this costs well under a millisecond.
//! Why a separate process at all (synapse/execution/DESIGN.md): forking the task straight
//! from the multi-threaded worker is unsafe, and would make the task's peak RSS the worker's.
//! The launcher has no threads, so its forked child may do anything before exec.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Deserialize;

/// What the worker's supervisor writes on SPEC_FD (JSON).
#[derive(Deserialize)]
struct Spec {
    supervisor: i32,
    cgroups: Vec<String>,
    rlimits: Vec<(String, i64, i64)>,
    uid: Option<u32>,
    gid: Option<u32>,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    pass_report: bool,
}

static CHILD: AtomicI32 = AtomicI32::new(0);

fn report(fd: i32, line: &str) {
    let mut text = line.replace('\n', " ");
    text.push('\n');
    // SAFETY: writing a buffer we own to a descriptor the caller handed us.
    unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
}

fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

fn cstring(text: &str) -> CString {
    // NUL bytes cannot reach here: the worker refuses them in argv and env.
    CString::new(text.replace('\0', "")).expect("no NUL left")
}

extern "C" fn stop(_signal: libc::c_int) {
    // The supervisor's kill (wall time, cancel, output bound) or the worker's death. The first
    // process is not reaped yet, so its pid (its process group's id) cannot have been reused.
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: async-signal-safe.
        unsafe { libc::killpg(child, libc::SIGKILL) };
    }
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

fn limit_value(v: i64) -> libc::rlim_t {
    if v < 0 {
        libc::RLIM_INFINITY // Python's resource.RLIM_INFINITY is -1
    } else {
        v as libc::rlim_t
    }
}

/// Default dispositions and an empty mask: ignored signals stay ignored across exec (the Rust
/// runtime ignores SIGPIPE), and the task must get the defaults (`yes | head` ends,
/// RLIMIT_FSIZE kills).
fn restore_signals() {
    // SAFETY: plain libc calls on a zeroed sigset.
    unsafe {
        for sig in [libc::SIGPIPE, libc::SIGXFSZ, libc::SIGTERM, libc::SIGINT] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// execvpe: the program as given if it has a '/', else each PATH directory in turn. Returns
/// why it could not (it does not return when it could).
fn exec(argv: &[String], env: &[CString]) -> String {
    let args: Vec<CString> = argv.iter().map(|a| cstring(a)).collect();
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let program = &argv[0];
    let path = env
        .iter()
        .find_map(|e| e.to_str().ok().and_then(|s| s.strip_prefix("PATH=")).map(str::to_owned))
        .unwrap_or_default();
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.clone()]
    } else {
        path.split(':').map(|d| format!("{}/{}", if d.is_empty() { "." } else { d }, program)).collect()
    };
    let mut denied = None;
    for candidate in candidates {
        let c = cstring(&candidate);
        // SAFETY: NUL-terminated arrays of pointers into CStrings that outlive the call.
        unsafe { libc::execve(c.as_ptr(), arg_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => continue,
            Some(libc::EACCES) => denied = Some(err),
            _ => return err.to_string(),
        }
    }
    match denied {
        Some(err) => err.to_string(),
        None if program.contains('/') => "no such file".to_owned(),
        None => format!("not found on PATH {}", path),
    }
}

/// In the forked child: confine this process, then exec the task's command.
fn become_task(spec: &Spec, report_fd: i32) -> ! {
    let fail = |step: &str| -> ! {
        report(report_fd, &format!("spawn_error {}: {}", step, errno_text()));
        // SAFETY: leaving the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: the launcher is single-threaded, so its forked child may call anything.
    unsafe {
        if libc::setsid() < 0 {
            fail("starting a session");
        }
        for path in &spec.cgroups {
            // "0" is "the writing process" in cgroup.procs, v1 and v2 alike.
            match std::fs::OpenOptions::new().write(true).open(path).and_then(|mut f| f.write_all(b"0")) {
                Ok(()) => {}
                Err(e) => {
                    report(report_fd, &format!("spawn_error joining cgroup {}: {}", path, e));
                    libc::_exit(127);
                }
            }
        }
        for (name, soft, hard) in &spec.rlimits {
            let Some(resource) = rlimit_resource(name) else {
                report(report_fd, &format!("spawn_error setting {}: unknown resource", name));
                libc::_exit(127);
            };
            let limit = libc::rlimit { rlim_cur: limit_value(*soft), rlim_max: limit_value(*hard) };
            if libc::setrlimit(resource, &limit) < 0 {
                fail(&format!("setting {}", name));
            }
        }
        if let Some(uid) = spec.uid {
            let gid = spec.gid.unwrap_or(uid);
            if libc::setgroups(0, std::ptr::null()) < 0 || libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                fail(&format!("switching to uid {}", uid));
            }
        }
        restore_signals();
        // Only bwrap's init (which reports the command's own status) may keep the pipe.
        let flags = libc::fcntl(report_fd, libc::F_GETFD);
        let flags = if spec.pass_report { flags & !libc::FD_CLOEXEC } else { flags | libc::FD_CLOEXEC };
        libc::fcntl(report_fd, libc::F_SETFD, flags);
    }
    let env: Vec<CString> = spec.env.iter().map(|(k, v)| cstring(&format!("{}={}", k, v))).collect();
    let err = exec(&spec.argv, &env);
    report(report_fd, &format!("spawn_error executing {}: {}", spec.argv.first().map(String::as_str).unwrap_or("?"), err));
    // SAFETY: as above.
    unsafe { libc::_exit(127) }
}

fn launch(spec_fd: i32, report_fd: i32) -> i32 {
    let mut raw = Vec::new();
    // SAFETY: the supervisor passed us this descriptor for us alone.
    let read = unsafe { File::from_raw_fd(spec_fd) }.read_to_end(&mut raw);
    let spec: Spec = match read.map_err(|e| e.to_string()).and_then(|_| serde_json::from_slice(&raw).map_err(|e| e.to_string())) {
        Ok(spec) => spec,
        Err(e) => {
            report(report_fd, &format!("spawn_error reading the launch spec: {}", e));
            return 127;
        }
    };
    if spec.argv.is_empty() {
        report(report_fd, "spawn_error the launch spec has an empty argv");
        return 127;
    }
    // SAFETY: installing an async-signal-safe handler and setting process attributes.
    unsafe {
        libc::signal(libc::SIGTERM, stop as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
        if libc::getppid() != spec.supervisor {
            report(report_fd, "spawn_error the worker exited before the task started");
            return 127;
        }
    }
    // SIGTERM must not land between fork and CHILD being set, when stop() cannot kill yet.
    let mut term: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset manipulation on a local.
    unsafe {
        libc::sigemptyset(&mut term);
        libc::sigaddset(&mut term, libc::SIGTERM);
        libc::sigprocmask(libc::SIG_BLOCK, &term, std::ptr::null_mut());
    }
    // SAFETY: single-threaded process; the child only runs become_task.
    let child = unsafe { libc::fork() };
    if child < 0 {
        report(report_fd, &format!("spawn_error starting the task's first process: {}", errno_text()));
        return 127;
    }
    if child == 0 {
        become_task(&spec, report_fd);
    }
    CHILD.store(child, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &term, std::ptr::null_mut()) };
    let mut status: libc::c_int = 0;
    loop {
        // Look before reaping: the first process is killed-around (its group) while its pid is
        // still held; orphans of the task are reaped as they come.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid into a zeroed siginfo we own.
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            report(report_fd, &format!("spawn_error waiting for the task: {}", errno_text()));
            return 127;
        }
        // SAFETY: si_pid is valid for the child-state siginfo waitid filled in.
        let pid = unsafe { info.si_pid() };
        if pid == 0 {
            continue;
        }
        if pid == child {
            stop(0);
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: reaping our own child into locals.
            unsafe { libc::wait4(child, &mut status, 0, &mut usage) };
            break;
        }
        // SAFETY: reaping an orphan we adopted.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage into a local.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    report(report_fd, &format!("exit {} {} {} {}", status, secs(usage.ru_utime), secs(usage.ru_stime), usage.ru_maxrss));
    0
}

fn init(report_fd: i32, argv: &[String]) -> i32 {
    // SAFETY: descriptor flags on a descriptor we were given.
    unsafe { libc::fcntl(report_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    restore_signals();
    if argv.is_empty() {
        report(report_fd, "spawn_error init was given no command");
        return 127;
    }
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| Some(cstring(&format!("{}={}", k.to_str()?, v.to_str()?))))
        .collect();
    // SAFETY: single-threaded; the child only execs.
    let command = unsafe { libc::fork() };
    if command < 0 {
        report(report_fd, &format!("spawn_error starting {}: {}", argv[0], errno_text()));
        return 127;
    }
    if command == 0 {
        let err = exec(argv, &env);
        report(report_fd, &format!("spawn_error executing {}: {}", argv[0], err));
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(127) };
    }
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waiting for any child into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return 127;
        }
        if pid == command {
            report(report_fd, &format!("status {}", status));
            return if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let fd = |i: usize| args.get(i).and_then(|a| a.parse::<i32>().ok());
    let code = match (args.get(1).map(String::as_str), fd(2), fd(3)) {
        (Some("launch"), Some(spec_fd), Some(report_fd)) => launch(spec_fd, report_fd),
        (Some("init"), Some(report_fd), _) => init(report_fd, &args[3..]),
        _ => {
            eprintln!("usage: synapse-launch launch SPEC_FD REPORT_FD | init REPORT_FD ARGV...");
            2
        }
    };
    std::process::exit(code);
}
