//go:build unix

package cache

import (
	"errors"
	"os"
	"syscall"
)

// lockInstance creates path and holds an exclusive flock on it for as long
// as the returned file is open. The kernel releases the lock when the
// process dies, however it dies (SIGKILL included): that is how Open tells
// the spool of a crashed process from the spool of a live one, without
// process ids (which a restarted container reuses).
func lockInstance(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// instanceDead reports whether the lock file at path exists and nobody
// holds its lock. (Locks are per open file description, so a live Cache in
// this very process is seen as alive too.)
func instanceDead(path string) bool {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if err != nil {
		return !errors.Is(err, syscall.EWOULDBLOCK)
	}
	return true
}
