// LD_PRELOAD=segv_backtrace.so: on SIGSEGV, SIGBUS, SIGILL or SIGFPE, print the faulting pc and the
// native stack (each frame's library, offset and nearest dynamic symbol) to stderr, then die of the
// signal. For hosts without gdb (the device machines): `addr2line -f -C -i -e LIB OFFSET` names a
// frame there. Under pytest, pass -s: its capture of fd 2 swallows what the handler writes.
// (Python's faulthandler, which pytest enables, hands the signal on to this handler after its dump.)
// Build: cc -shared -fPIC -O1 -o /tmp/segv.so scripts/segv_backtrace.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static char alt_stack[1 << 17];

static void print_frame(const char* tag, void* pc) {
  char line[1024];
  Dl_info info;
  int n;
  if (dladdr(pc, &info) && info.dli_fname) {
    n = snprintf(line, sizeof line, "%s %p %s +0x%lx %s\n", tag, pc, info.dli_fname,
                 (unsigned long)((char*)pc - (char*)info.dli_fbase), info.dli_sname ? info.dli_sname : "?");
  } else {
    n = snprintf(line, sizeof line, "%s %p ?\n", tag, pc);
  }
  if (n > 0) write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static void on_fault(int sig, siginfo_t* si, void* ctx) {
  ucontext_t* uc = (ucontext_t*)ctx;
  char line[256];
  int n = snprintf(line, sizeof line, "SEGV_BACKTRACE signal %d addr %p rsp %p\n", sig, si->si_addr,
                   (void*)uc->uc_mcontext.gregs[REG_RSP]);
  write(2, line, (size_t)n);
  print_frame("SEGV_PC", (void*)uc->uc_mcontext.gregs[REG_RIP]);
  void* frames[96];
  int count = backtrace(frames, 96);
  for (int i = 0; i < count; ++i) print_frame("SEGV_FRAME", frames[i]);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
  for (unsigned i = 0; i < sizeof signals / sizeof signals[0]; ++i) sigaction(signals[i], &sa, NULL);
}
