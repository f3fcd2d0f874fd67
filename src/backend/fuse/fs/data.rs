//! File data: open (passthrough or page cache, never mixed for one inode), read, write.

use super::*;

impl ShiftFs {
    pub(super) fn do_open(
        &self,
        host: (OuterUid, OuterGid),
        ino: INodeNo,
        flags: OpenFlags,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Result<(u64, FopenFlags, Option<Arc<BackingId>>)> {
        let inode = self.inode(ino)?;
        // The kernel sends OPEN for regular files only (it opens FIFOs and devices itself);
        // opening anything else for real would have effects of its own.
        if !inode.is_reg() {
            return Err(Errno::EIO);
        }
        if is_write(flags.0) {
            self.check_writable(&inode)?;
        }
        if flags.0 & FMODE_EXEC != 0 && inode.mount.noexec() {
            // As the kernel's exec on a `noexec` mount (mmap with PROT_EXEC cannot be
            // refused here: the kernel does not ask).
            return Err(Errno::EACCES);
        }
        let slot = self.open_slot(host.0.get())?;
        let ifd = inode.fd().map_err(io)?;
        let fd = self
            .proc
            .reopen(ifd.as_fd(), backing_open_flags(flags.0))
            .map_err(io)?;
        let mode = self.open_mode(&inode, fd.as_fd(), is_write(flags.0), host, register);
        Ok(self.open_handle(inode, fd, mode, slot))
    }

    pub(super) fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        // Short reads only at EOF: FUSE zero-fills whatever we do not return.
        while done < buf.len() {
            match rustix::io::pread(h.fd(), &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(SysErrno::INTR) => {}
                Err(e) => return Err(sys(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub(super) fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.file(fh)?;
        let mut done = 0;
        while done < data.len() {
            match rustix::io::pwrite(h.fd(), &data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(SysErrno::INTR) => {}
                Err(e) if done > 0 && e != SysErrno::INTR => break,
                Err(e) => return Err(sys(e)),
            }
        }
        u32::try_from(done).map_err(|_| Errno::EOVERFLOW)
    }
}
