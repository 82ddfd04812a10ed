// LD_PRELOAD library: the process, and every thread and child it starts, sees this CPU as an
// AVX2 + FMA one. AVX-512, AMX, AVX-VNNI and AVX10 are cleared from what the `cpuid`
// instruction reports, so that ONNX Runtime's MLAS, OpenVINO's oneDNN and streamdet all pick
// their AVX2 kernels on an AVX-512 machine and can be compared AVX2 against AVX2 (none of
// them has an instruction-set cap that the other two share; MLAS has none at all).
//
// How: Linux's CPUID faulting (`arch_prctl(ARCH_SET_CPUID, 0)`, on CPUs and hypervisors that
// offer it: the `cpuid_fault` flag in /proc/cpuinfo) makes each `cpuid` raise SIGSEGV; the
// handler runs the real instruction with faulting lifted for a moment, clears the bits, writes
// the registers and steps over the two-byte instruction. The setting is per thread, inherited
// by new threads and children, and reset by execve (the preload sets it again there).
//
// What it cannot reach: the dynamic loader reads cpuid before any preload runs, so glibc's own
// string functions choose for the real CPU (`scripts/as-avx2.sh` caps those with
// GLIBC_TUNABLES); code that reads XCR0 (`xgetbv`) alone still sees the AVX-512 state enabled,
// but the libraries above test the cpuid feature bits first.
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static atomic_ulong emulated;

// What the program asked for SIGSEGV (Python's faulthandler, perf, a runtime's guard pages):
// kept here and called for every fault that is not a cpuid, while the kernel keeps this
// library's handler, so that a program that installs its own cannot turn cpuid into a crash.
static struct sigaction program_action;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
typedef sighandler_t (*signal_fn)(int, sighandler_t);

// libc's own functions, looked up on first use: another library's constructor may set a
// handler before this library's runs.
static sigaction_fn real_sigaction(void) {
    static sigaction_fn real;
    if (!real)
        real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real;
}

static signal_fn real_signal(void) {
    static signal_fn real;
    if (!real)
        real = (signal_fn)dlsym(RTLD_NEXT, "signal");
    return real;
}

static long set_cpuid_enabled(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

// Clears the features an AVX2 + FMA CPU (AMD Zen 3, Intel Haswell to Comet Lake) lacks.
static void mask(unsigned leaf, unsigned subleaf, unsigned regs[4]) {
    enum { EAX, EBX, ECX, EDX };
    if (leaf == 7 && subleaf == 0) {
        // AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL.
        regs[EBX] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        // AVX512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ.
        regs[ECX] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        // AVX512 4VNNIW, 4FMAPS, VP2INTERSECT; AMX BF16, AVX512 FP16, AMX TILE, AMX INT8.
        regs[EDX] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && subleaf == 1) {
        // AVX-VNNI, AVX512 BF16, AMX FP16, AVX-IFMA.
        regs[EAX] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        // AVX-VNNI-INT8, AVX-NE-CONVERT, AMX COMPLEX, AVX-VNNI-INT16, AVX10.
        regs[EDX] &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19));
    } else if (leaf == 0xd && subleaf == 0) {
        // The XSAVE state components: opmask, ZMM upper halves, ZMM16-31, AMX tile config and data.
        regs[EAX] &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        // AMX palettes, TMUL, AVX10: nothing to report.
        memset(regs, 0, 4 * sizeof regs[0]);
    }
}

static void on_segv(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *gregs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)gregs[REG_RIP];
    // A faulting cpuid arrives as a general-protection fault (SI_KERNEL) at the instruction,
    // which the CPU has fetched, so its two bytes are readable.
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        if (program_action.sa_flags & SA_SIGINFO) {
            program_action.sa_sigaction(signo, info, context);
        } else if (program_action.sa_handler != SIG_DFL && program_action.sa_handler != SIG_IGN) {
            program_action.sa_handler(signo);
        } else {
            // The default action: when the faulting instruction runs again, or, for a signal
            // sent by kill or raise (si_code <= 0), sent again now.
            struct sigaction fallback = {.sa_handler = SIG_DFL};
            real_sigaction()(SIGSEGV, &fallback, NULL);
            if (info->si_code <= 0)
                raise(signo);
        }
        return;
    }
    unsigned leaf = (unsigned)gregs[REG_RAX], subleaf = (unsigned)gregs[REG_RCX];
    unsigned regs[4];
    set_cpuid_enabled(1);
    __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
    set_cpuid_enabled(0);
    mask(leaf, subleaf, regs);
    gregs[REG_RAX] = regs[0];
    gregs[REG_RBX] = regs[1];
    gregs[REG_RCX] = regs[2];
    gregs[REG_RDX] = regs[3];
    gregs[REG_RIP] += 2;
    atomic_fetch_add_explicit(&emulated, 1, memory_order_relaxed);
}

int sigaction(int signo, const struct sigaction *action, struct sigaction *old) {
    if (signo != SIGSEGV)
        return real_sigaction()(signo, action, old);
    if (old)
        *old = program_action;
    if (action)
        program_action = *action;
    return 0;
}

sighandler_t signal(int signo, sighandler_t handler) {
    if (signo != SIGSEGV)
        return real_signal()(signo, handler);
    struct sigaction action = {.sa_handler = handler}, old;
    sigemptyset(&action.sa_mask);
    if (sigaction(signo, &action, &old) != 0)
        return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (!real_sigaction() || real_sigaction()(SIGSEGV, &action, NULL) != 0 || set_cpuid_enabled(0) != 0) {
        fprintf(stderr, "cpuid_avx2: CPUID faulting is not available here (no cpuid_fault in /proc/cpuinfo?)\n");
        _exit(97);
    }
}

__attribute__((destructor)) static void finish(void) {
    if (getenv("CPUID_AVX2_REPORT"))
        fprintf(stderr, "cpuid_avx2: pid %d answered %lu cpuid instructions\n", getpid(), atomic_load(&emulated));
}
