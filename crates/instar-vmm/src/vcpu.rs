//! The VM and its one vCPU: guest image loading, long mode at ring 3, and
//! the run loop.
//!
//! Ring 3 matters on these machines: under the nested `kvm_pvm` hypervisor
//! ring-0 guest code is emulated (~1500x slower) while ring-3 code runs
//! natively. So code and data segments have DPL 3, every page-table level
//! has the user bit, and RFLAGS.IOPL=3 lets the guest ring its doorbells
//! with `out`. There is no IDT: any guest exception becomes a triple fault,
//! which KVM reports as KVM_EXIT_SHUTDOWN.

use crate::mailbox::{Exit, HostMailbox};
use crate::memory::GuestMemory;
use crate::VmmError;
use instar_wire::mailbox::{
    CODE_ADDR, CODE_LIMIT, MAILBOX_ADDR, PAGE_SIZE, STACK_BOTTOM, STACK_TOP,
};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

// System structures in the first (supervisor-only) 2 MiB page.
const GDT_ADDR: u64 = 0x1000;
const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
/// One page directory per GiB of guest RAM, up to `MAX_MEMORY`.
const PD_ADDR: u64 = 0x4000;
const TSS_ADDR: u64 = 0x8000;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_LARGE: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 is reserved-one; IOPL=3 (bits 12-13) allows `out` at ring 3.
const RFLAGS: u64 = 0x3002;

/// GDT: null, 64-bit code DPL 3, data DPL 3.
const GDT: [u64; 3] = [0, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff];
const CODE_SELECTOR: u16 = 0x08 | 3;
const DATA_SELECTOR: u16 = 0x10 | 3;

/// A VM with guest RAM, the guest image and one configured vCPU.
pub struct Vm {
    // Kept open for the VM's lifetime (the vCPU belongs to it).
    _vm: VmFd,
    vcpu: VcpuFd,
    /// Guest RAM.
    pub memory: GuestMemory,
}

impl Vm {
    /// Create the VM, map `memory_bytes` of RAM, load `elf`, set up the
    /// vCPU to start at the ELF entry at ring 3.
    pub fn new(kvm: &Kvm, memory_bytes: u64, elf: &[u8]) -> Result<Self, VmmError> {
        let kvm_err = |what: &str, e: kvm_ioctls::Error| {
            VmmError::Failed(format!(
                "{what}: {}",
                crate::os_error(std::io::Error::from_raw_os_error(e.errno()))
            ))
        };
        let vm = kvm
            .create_vm()
            .map_err(|e| kvm_err("cannot create a VM", e))?;
        let mut memory = GuestMemory::new(memory_bytes)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.host_addr(),
        };
        // SAFETY: the region is our live anonymous mapping of exactly
        // `memory_size` bytes, owned by `memory`, which lives in the same
        // struct as the VM and is dropped after it (field order: the VM fd
        // closes first, then the vCPU, then memory is unmapped).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| kvm_err("cannot map guest memory", e))?;
        let entry = load_elf(&mut memory, elf)?;
        write_system_tables(&mut memory)?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| kvm_err("cannot create a vCPU", e))?;
        setup_vcpu(&vcpu, entry).map_err(|e| kvm_err("cannot set up the vCPU", e))?;
        Ok(Self {
            _vm: vm,
            vcpu,
            memory,
        })
    }

    /// Run until the guest is done, fails, or breaks the protocol.
    pub fn run(&mut self, mailbox: &mut HostMailbox) -> Result<instar_wire::Response, VmmError> {
        loop {
            mailbox.exits += 1;
            if mailbox.exits > mailbox.exit_limit {
                return Err(VmmError::Failed(format!(
                    "guest made more than {} calls (MAX_EXITS); stopped",
                    mailbox.exit_limit
                )));
            }
            let port = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, _)) => port,
                Ok(VcpuExit::Shutdown) => {
                    return Err(VmmError::Failed(
                        "guest fault: the guest crashed (KVM_EXIT_SHUTDOWN, e.g. a page fault or stack overflow)".into(),
                    ))
                }
                Ok(VcpuExit::Hlt) => return Err(VmmError::Failed("guest fault: unexpected halt".into())),
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(VmmError::Failed(format!("cannot enter the guest (hardware reason {reason:#x})")))
                }
                Ok(VcpuExit::InternalError) => {
                    return Err(VmmError::Failed("guest fault: KVM internal error (emulation failure)".into()))
                }
                Ok(other) => return Err(VmmError::Failed(format!("guest fault: unexpected VM exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(VmmError::Failed(format!(
                        "KVM_RUN failed: {}",
                        crate::os_error(std::io::Error::from_raw_os_error(e.errno()))
                    )))
                }
            };
            match mailbox.handle(port, &mut self.memory)? {
                Exit::Continue => {}
                Exit::Done(response) => return Ok(*response),
            }
        }
    }
}

/// Load the PT_LOAD segments of our own (trusted, build-time) guest ELF and
/// give its entry point. Checked anyway: a broken build must fail cleanly.
fn load_elf(memory: &mut GuestMemory, elf: &[u8]) -> Result<u64, VmmError> {
    let bad = |why: &str| VmmError::Failed(format!("embedded guest image is invalid: {why}"));
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(bad(if elf.is_empty() {
            "empty (built with INSTAR_GUEST_ELF unset and no guest?)"
        } else {
            "not an ELF64 LE file"
        }));
    }
    let entry = u64_at(24).ok_or_else(|| bad("short header"))?;
    let phoff = u64_at(32).ok_or_else(|| bad("short header"))? as usize;
    let phentsize = usize::from(u16_at(54).ok_or_else(|| bad("short header"))?);
    let phnum = usize::from(u16_at(56).ok_or_else(|| bad("short header"))?);
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset"))?;
        if u32_at(ph).ok_or_else(|| bad("program header"))? != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(ph + 8).ok_or_else(|| bad("program header"))?;
        let paddr = u64_at(ph + 24).ok_or_else(|| bad("program header"))?;
        let filesz = u64_at(ph + 32).ok_or_else(|| bad("program header"))?;
        let memsz = u64_at(ph + 40).ok_or_else(|| bad("program header"))?;
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad("segment size"))?;
        if paddr < CODE_ADDR || end > CODE_LIMIT || filesz > memsz {
            return Err(bad("segment outside the code window"));
        }
        let data = usize::try_from(offset)
            .ok()
            .and_then(|o| elf.get(o..o.checked_add(filesz as usize)?))
            .ok_or_else(|| bad("segment data past the end of the file"))?;
        // The rest up to memsz (bss) is already zero: fresh anonymous memory.
        memory
            .write(paddr, data)
            .ok_or_else(|| bad("segment outside guest memory"))?;
    }
    if !(CODE_ADDR..CODE_LIMIT).contains(&entry) {
        return Err(bad("entry point outside the code window"));
    }
    Ok(entry)
}

/// GDT, TSS and the identity map with 2 MiB pages.
fn write_system_tables(memory: &mut GuestMemory) -> Result<(), VmmError> {
    let oob = || VmmError::Failed("guest memory too small for the system tables".into());
    for (i, d) in GDT.iter().enumerate() {
        memory
            .write_u64(GDT_ADDR + 8 * i as u64, *d)
            .ok_or_else(oob)?;
    }
    let table = PTE_PRESENT | PTE_WRITE | PTE_USER;
    memory
        .write_u64(PML4_ADDR, PDPT_ADDR | table)
        .ok_or_else(oob)?;
    let pages = memory.size() / PAGE_SIZE;
    let gibs = memory.size().div_ceil(1 << 30);
    for g in 0..gibs {
        memory
            .write_u64(PDPT_ADDR + 8 * g, (PD_ADDR + 0x1000 * g) | table)
            .ok_or_else(oob)?;
    }
    for page in 0..pages {
        let addr = page * PAGE_SIZE;
        let entry = if page == 0 {
            // System page: no user bit, so ring 3 cannot touch the page
            // tables and a null pointer faults.
            addr | PTE_PRESENT | PTE_WRITE | PTE_LARGE
        } else if (CODE_LIMIT..STACK_BOTTOM).contains(&addr) {
            0 // stack guard
        } else {
            addr | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_LARGE
        };
        memory
            .write_u64(PD_ADDR + 8 * page, entry)
            .ok_or_else(oob)?;
    }
    Ok(())
}

fn setup_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // A 64-bit busy TSS: never used (no privilege changes, no interrupts),
    // but hardware entry checks want one in long mode.
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: 0x67,
        selector: 0,
        type_: 0xb,
        s: 0,
        dpl: 0,
        db: 0,
        l: 0,
        g: 0,
        ..code
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        // As if the entry had just been called: rsp + 8 is 16-byte aligned.
        rsp: STACK_TOP - 8,
        rdi: MAILBOX_ADDR,
        rflags: RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
}
