//! `CARDINAL_ISA` handling through the real environment. This test binary holds
//! a single test so nothing else reads the environment while it is changed.

use cardinal_kernels::{Isa, KernelError, active_isa, init_isa};

#[test]
fn cardinal_isa_env_is_parsed_and_checked() {
    let set = |v: &str| {
        // SAFETY: this is the only test in this binary, so no other thread
        // reads or writes the environment concurrently.
        unsafe { std::env::set_var("CARDINAL_ISA", v) }
    };
    set("avx-9000");
    let e = Isa::from_env().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, KernelError::UnknownIsa { .. }));
    assert!(
        msg.contains("avx-9000") && msg.contains("scalar, avx2, avx512, neon"),
        "{msg}"
    );
    assert!(init_isa().is_err(), "init_isa reports the bad value");
    assert_eq!(
        active_isa(),
        Isa::best(),
        "uninitialised falls back to best()"
    );

    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon] {
        set(isa.name());
        match Isa::from_env() {
            Ok(got) => assert!(got == isa && isa.available()),
            Err(e) => {
                assert!(!isa.available());
                assert!(e.to_string().contains(isa.name()), "{e}");
            }
        }
    }
    set("SCALAR");
    assert_eq!(Isa::from_env().unwrap(), Isa::Scalar);
    assert_eq!(init_isa().unwrap(), Isa::Scalar);
    assert_eq!(active_isa(), Isa::Scalar);
    set("avx2");
    assert_eq!(
        init_isa().unwrap(),
        Isa::Scalar,
        "the first successful choice sticks"
    );

    // SAFETY: as above, single test in this binary.
    unsafe { std::env::remove_var("CARDINAL_ISA") };
    assert_eq!(Isa::from_env().unwrap(), Isa::best());
    assert_eq!(format!("{}", Isa::Avx512), "avx512-vnni");
    assert_eq!(Isa::Avx512.name(), "avx512");
    #[cfg(target_arch = "x86_64")]
    assert!(!Isa::Neon.available());
}
