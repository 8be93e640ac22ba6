package clients

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// StartTimeout bounds how long a daemon may take to become ready.
const StartTimeout = 60 * time.Second

// daemon is a long-running process started by a test: its output goes to a
// log file, it is stopped by PID, and processes it left behind (found by the
// temporary directories they mention) are killed and mounts under its
// directories removed.
type daemon struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	logFile *os.File
	markers []string // directories only this daemon (and its children) uses

	done    chan struct{}
	waitErr error

	stopOnce sync.Once
	stopErr  error
}

func startDaemon(name, path string, args, env []string, logPath string, markers []string) (*daemon, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(path, args...)
	cmd.Env = env
	cmd.Dir = filepath.Dir(logPath)
	// A file, not a pipe: children (containerd, shims) inherit it, and a pipe
	// they hold open would keep Wait from returning.
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, logPath: logPath, logFile: lf, markers: markers, done: make(chan struct{})}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.done)
	}()
	return d, nil
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

func (d *daemon) logs() string {
	b, _ := os.ReadFile(d.logPath)
	return string(b)
}

// waitReady polls ready until it returns nil, the daemon exits, or the
// timeout passes.
func (d *daemon) waitReady(timeout time.Duration, ready func(context.Context) error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if d.exited() {
			return fmt.Errorf("%s exited during start (%v); log:\n%s", d.name, d.waitErr, tail(d.logs(), 4000))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		last = ready(ctx)
		cancel()
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v; log:\n%s", d.name, timeout, last, tail(d.logs(), 4000))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM to the daemon's PID, waits up to grace, then kills its
// process group; then it kills leftovers and detaches leftover mounts.
func (d *daemon) stop(grace time.Duration) error {
	d.stopOnce.Do(func() {
		var errs []error
		if !d.exited() {
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(grace):
				errs = append(errs, fmt.Errorf("%s (pid %d) ignored SIGTERM for %s; killed", d.name, d.pid(), grace))
				_ = syscall.Kill(-d.pid(), syscall.SIGKILL)
				select {
				case <-d.done:
				case <-time.After(10 * time.Second):
					errs = append(errs, fmt.Errorf("%s (pid %d) survived SIGKILL", d.name, d.pid()))
				}
			}
		}
		if pids := killLeftovers(d.markers); len(pids) > 0 {
			errs = append(errs, fmt.Errorf("%s left processes behind, killed: %v", d.name, pids))
		}
		for _, m := range d.markers {
			if err := unmountUnder(m); err != nil {
				errs = append(errs, err)
			}
		}
		d.logFile.Close()
		d.stopErr = errors.Join(errs...)
	})
	return d.stopErr
}

// killLeftovers SIGKILLs every process (other than this one) whose command
// line, root or working directory mentions one of the markers: the daemon's
// own temporary directories, so nothing but its descendants match.
func killLeftovers(markers []string) []int {
	var killed []int
	if len(markers) == 0 {
		return nil
	}
	for round := 0; round < 3; round++ {
		pids := findProcs(markers)
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				killed = append(killed, pid)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return killed
}

func findProcs(markers []string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid <= 1 {
			continue
		}
		if stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			// Zombies are gone already; only their parent can reap them.
			if i := strings.LastIndexByte(string(stat), ')'); i > 0 && strings.HasPrefix(string(stat[i:]), ") Z") {
				continue
			}
		}
		var texts []string
		if b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil {
			texts = strings.Split(string(b), "\x00")
		}
		for _, l := range []string{"root", "cwd"} {
			if s, err := os.Readlink(filepath.Join("/proc", e.Name(), l)); err == nil && s != "/" {
				texts = append(texts, s)
			}
		}
		if mentions(texts, markers) {
			out = append(out, pid)
		}
	}
	return out
}

// mentions reports whether one of texts is a marker directory or contains a
// path below one.
func mentions(texts, markers []string) bool {
	for _, txt := range texts {
		for _, m := range markers {
			m = filepath.Clean(m)
			if m == "/" || m == "." {
				continue
			}
			if strings.HasSuffix(txt, m) || strings.Contains(txt, m+"/") {
				return true
			}
		}
	}
	return false
}

// unmountUnder detaches every mount at or below dir (deepest first), so that
// t.TempDir's cleanup can remove it.
func unmountUnder(dir string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	dir = filepath.Clean(dir)
	var mps []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	var errs []error
	for _, mp := range mps {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount undoes the octal escapes (\040 for space, ...) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// shortDir returns a directory for sockets. Unix socket paths are limited to
// 107 bytes and t.TempDir() can be long (test name up to 64 bytes, TMPDIR),
// so when it is, the directory is made directly under /tmp and removed at
// cleanup.
func shortDir(t testing.TB, need int) string {
	t.Helper()
	d := t.TempDir()
	if len(d)+need <= 100 {
		return d
	}
	d, err := os.MkdirTemp("/tmp", "psc")
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	t.Cleanup(func() {
		_ = unmountUnder(d)
		if err := os.RemoveAll(d); err != nil {
			t.Errorf("clients: remove %s: %v", d, err)
		}
	})
	return d
}

// daemonEnv is the environment of a daemon: PATH, and HOME/TMPDIR in dir.
func daemonEnv(dir string, extra ...string) []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	home := filepath.Join(dir, "home")
	tmp := filepath.Join(dir, "tmp")
	_ = os.MkdirAll(home, 0o700)
	_ = os.MkdirAll(tmp, 0o700)
	return mergeEnv([]string{"PATH=" + path, "HOME=" + home, "TMPDIR=" + tmp}, extra)
}
