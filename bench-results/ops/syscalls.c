/* The syscalls the daemon makes per request, each alone, on an O_PATH fd of a file on a tmpfs
 * (issue 16): gcc -O2 -o syscalls syscalls.c && mount -t tmpfs tmpfs D && touch D/f && ./syscalls D */
#define _GNU_SOURCE
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <linux/openat2.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c, char**v){
  int dfd=open(v[1],O_PATH|O_DIRECTORY);
  int fd=openat(dfd,"f",O_PATH|O_NOFOLLOW);
  long r=syscall(452,fd,"",0600,AT_EMPTY_PATH); printf("fchmodat2 EMPTY_PATH O_PATH: %ld %s\n",r,r?strerror(errno):"");
  struct timespec ts[2]={{0,UTIME_NOW},{0,UTIME_OMIT}};
  r=utimensat(fd,"",ts,AT_EMPTY_PATH); printf("utimensat EMPTY_PATH O_PATH: %ld %s\n",r,r?strerror(errno):"");
  int wfd=openat(dfd,"f",O_WRONLY); char buf[256];
  r=fgetxattr(wfd,"security.capability",buf,256); printf("fgetxattr wronly: %ld %s\n",r,strerror(errno));
  int N=100000; char p[64]; snprintf(p,64,"/proc/self/fd/%d",fd);
  double t;
  t=now(); for(int i=0;i<N;i++) fgetxattr(wfd,"security.capability",buf,256); printf("fgetxattr %.2f us\n",(now()-t)/N*1e6);
  t=now(); for(int i=0;i<N;i++) getxattr(p,"security.capability",buf,256); printf("proc getxattr %.2f us\n",(now()-t)/N*1e6);
  t=now(); for(int i=0;i<N;i++) chmod(p,0644); printf("proc chmod %.2f us\n",(now()-t)/N*1e6);
  t=now(); for(int i=0;i<N;i++) syscall(452,fd,"",0644,AT_EMPTY_PATH); printf("fchmodat2 empty %.2f us\n",(now()-t)/N*1e6);
  t=now(); for(int i=0;i<N;i++) utimensat(AT_FDCWD,p,ts,0); printf("proc utimensat %.2f us\n",(now()-t)/N*1e6);
  t=now(); for(int i=0;i<N;i++) utimensat(fd,"",ts,AT_EMPTY_PATH); printf("utimensat empty %.2f us\n",(now()-t)/N*1e6);
  int pfd=open("/proc/self/fd",O_PATH|O_DIRECTORY); char nm[16]; snprintf(nm,16,"%d",fd);
  t=now(); for(int i=0;i<N;i++) {int f=openat(pfd,nm,O_PATH|O_CLOEXEC); close(f);} printf("procfd reopen O_PATH+close %.2f us\n",(now()-t)/N*1e6);
  struct open_how how={.flags=O_PATH|O_NOFOLLOW|O_CLOEXEC,.resolve=RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV};
  t=now(); for(int i=0;i<N;i++) {int f=syscall(SYS_openat2,dfd,"f",&how,sizeof how); close(f);} printf("openat2 O_PATH+close %.2f us\n",(now()-t)/N*1e6);
  t=now(); for(int i=0;i<N;i++) {int f=syscall(428,fd,"",AT_EMPTY_PATH|O_CLOEXEC); close(f);} printf("open_tree+close %.2f us\n",(now()-t)/N*1e6);
  t=now(); for(int i=0;i<N;i++) {close(dup(fd));} printf("dup+close %.2f us\n",(now()-t)/N*1e6);
  struct stat st; t=now(); for(int i=0;i<N;i++) fstat(fd,&st); printf("fstat %.2f us\n",(now()-t)/N*1e6);
  return 0;}
