// Package fsutil holds the file primitives every store of pullsecret shares:
// atomic replacement and a cross-process writers' lock.
package fsutil

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// WriteFileAtomic writes data to path so that a reader, or a crash at any
// moment, sees either the old file or the new one: temporary file in the
// same folder, fsync, rename, fsync of the folder.
func WriteFileAtomic(path string, data []byte) error {
	return place(path, data, os.Rename)
}

// CreateFileAtomic is WriteFileAtomic for a file that must not exist yet
// (keys that are never replaced): the temporary file is hard-linked to
// path, which fails with fs.ErrExist rather than overwrite.
func CreateFileAtomic(path string, data []byte) error {
	return place(path, data, func(tmp, path string) error {
		err := os.Link(tmp, path)
		os.Remove(tmp)
		return err
	})
}

// place writes data to a synced temporary file (mode 0600) next to path,
// moves it there with move, and syncs the folder.
func place(path string, data []byte, move func(tmp, path string) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = move(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer d.Close()
	if err = d.Sync(); err != nil {
		return fmt.Errorf("write %s: sync folder: %w", path, err)
	}
	return nil
}

// Lock takes an exclusive advisory lock that serialises writers across
// processes. The kernel drops it when the process dies, so a killed writer
// never leaves the store locked.
func Lock(path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// EnsureDir creates dir with mode 0700. An existing folder keeps its mode:
// the operator may have pointed the home at a folder they manage.
func EnsureDir(dir string) error {
	return os.MkdirAll(dir, 0o700)
}
