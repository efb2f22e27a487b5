//! `hvrun`: build the hypervisor, boot it in an emulator, stream its serial
//! output. `scripts/run` is a thin wrapper around this; the work is in
//! `hv_tests::launch`, which the integration tests call too.

use std::process::ExitCode;

use hv_tests::emulator;
use hv_tests::launch::{self, USAGE};
use hv_tests::Machine;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match launch::options(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("hvrun: {e}");
            return ExitCode::from(2);
        }
    };
    if o.machine == Machine::Kvm {
        if let Err(why) = emulator::kvm_vmx_usable() {
            eprintln!("hvrun: --machine kvm refused: {why}.\nUse --machine bochs (VMX emulated) on this host.");
            return ExitCode::from(3);
        }
    }
    let name = format!("run-{}-{:?}", o.arch.name(), o.machine).to_lowercase();
    let mut prepared = match launch::prepare(&o, &name) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hvrun: {e}");
            return ExitCode::from(1);
        }
    };
    prepared.spec.stream = true;
    if let Some(linger) = prepared.spec.stop_after_updater {
        eprintln!(
            "hvrun: your guests run beside the updater guest ({} update{}); the run ends when every guest has \
             stopped, or {}s after the updater guest has stopped",
            prepared.updates,
            if prepared.updates == 1 { "" } else { "s" },
            linger.as_secs()
        );
    }
    eprintln!(
        "hvrun: booting {} on {:?} ({} CPUs, {} MiB, timeout {}s)",
        prepared.image.bootable.display(),
        o.machine,
        prepared.spec.cpus,
        prepared.spec.mem_mib,
        o.timeout
    );
    let outcome = match launch::run(&prepared) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hvrun: {e}");
            return ExitCode::from(1);
        }
    };
    if !prepared.guests.is_empty() {
        print!("{}", launch::summary(&prepared, &outcome));
    }
    match launch::verdict(&prepared, &outcome) {
        Ok(line) => {
            eprintln!("hvrun: {line}; serial log: {}", outcome.log_path.display());
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("hvrun: {why}");
            ExitCode::from(1)
        }
    }
}
