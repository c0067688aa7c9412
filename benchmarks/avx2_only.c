/* An AVX2-only CPU, as far as the programs in this process can tell: loaded with LD_PRELOAD, it
 * hides AVX-512, AVX-VNNI and AMX from CPUID, so onnxruntime (MLAS), numpy and torch pick the
 * kernels they would pick on, say, an AMD Zen 3. The machine still runs at its own clock and
 * memory speed: ratios measured under it are an AVX2 machine's kernels on this machine's hardware.
 *
 * How: Linux's ARCH_SET_CPUID makes CPUID fault (on CPUs with CPUID faulting: the cpuid_fault
 * flag), the SIGSEGV handler below runs the real CPUID with faulting briefly off, clears the
 * feature bits and steps over the instruction. Threads inherit the setting; execve resets it.
 *
 *   cc -O2 -shared -fPIC -o avx2_only.so benchmarks/avx2_only.c
 *   LD_PRELOAD=$PWD/avx2_only.so python benchmarks/suite.py      (or: suite.py --cpu avx2)
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static long set_cpuid(unsigned long enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not CPUID: a real fault, which recurs with the default action */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)reg[REG_RAX], sub = (uint32_t)reg[REG_RCX], a, b, c, d;
    set_cpuid(1);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512 F DQ IFMA PF ER CD BW VL; ECX: VBMI VBMI2 VNNI BITALG VPOPCNTDQ; EDX: 4VNNIW 4FMAPS
         * VP2INTERSECT AMX-BF16 AVX512-FP16 AMX-TILE AMX-INT8 */
        b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        a &= ~((1u << 4) | (1u << 5) | (1u << 23)); /* AVX-VNNI, AVX512-BF16, AVX-IFMA */
    }
    reg[REG_RAX] = a;
    reg[REG_RBX] = b;
    reg[REG_RCX] = c;
    reg[REG_RDX] = d;
    reg[REG_RIP] += 2;
}

__attribute__((constructor)) static void hide_avx512(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, 0);
    set_cpuid(0);
}
