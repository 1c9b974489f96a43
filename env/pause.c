/* The pod sandbox process of the local node (containerd's sandbox_image, built by
 * `scripts/images.sh pause`): it holds the pod's namespaces, reaps the orphans it inherits as
 * the pod's PID 1, and exits on SIGINT or SIGTERM. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction a = {0};
  a.sa_handler = stop;
  sigaction(SIGINT, &a, NULL);
  sigaction(SIGTERM, &a, NULL);
  a.sa_handler = reap;
  a.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &a, NULL);
  for (;;) pause();
}
