package clients_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
)

func TestRunCapturesSeparately(t *testing.T) {
	env := clients.NewEnv(t)
	res, err := env.Run(context.Background(), "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
	if err == nil {
		t.Fatal("exit 3 gave no error")
	}
	if res.Stdout != "to-out\n" || res.Stderr != "to-err\n" || res.ExitCode != 3 {
		t.Errorf("got stdout %q stderr %q exit %d", res.Stdout, res.Stderr, res.ExitCode)
	}
	if !strings.Contains(err.Error(), "to-err") {
		t.Errorf("error does not quote stderr: %v", err)
	}
}

func TestRunTimeoutKillsProcessGroup(t *testing.T) {
	env := clients.NewEnv(t, clients.WithTimeout(500*time.Millisecond))
	pidFile := filepath.Join(env.Dir(), "child.pid")
	start := time.Now()
	// The child sleeps in the background with the pipes closed, the parent
	// waits: both must die at the timeout.
	res, err := env.Run(context.Background(), "sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $! > "+pidFile+"; wait")
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want a deadline error, got %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %s", d)
	}
	if res.ExitCode != -1 {
		t.Errorf("exit code %d, want -1", res.ExitCode)
	}
	b, _ := os.ReadFile(pidFile)
	if pid, _ := strconv.Atoi(strings.TrimSpace(string(b))); pid > 0 {
		time.Sleep(100 * time.Millisecond)
		if alive(pid) {
			t.Errorf("background child %d survived the timeout", pid)
		}
	}
}

func TestEnvIsMinimal(t *testing.T) {
	t.Setenv("PULLSECRET_LEAK_CHECK", "leaked")
	env := clients.NewEnv(t, clients.WithHelperDir("/opt/helpers"), clients.WithEnv("EXTRA=1", "TMPDIR=/override"))
	res, err := env.Run(context.Background(), "env")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	var keys []string
	for _, l := range strings.Split(strings.TrimSpace(res.Stdout), "\n") {
		k, v, _ := strings.Cut(l, "=")
		got[k] = v
		keys = append(keys, k)
	}
	sort.Strings(keys)
	want := []string{"CONTAINERS_REGISTRIES_CONF", "DOCKER_CONFIG", "EXTRA", "HOME", "PATH", "REGISTRY_AUTH_FILE", "TMPDIR"}
	if strings.Join(keys, " ") != strings.Join(want, " ") {
		t.Errorf("environment keys %v, want %v", keys, want)
	}
	if !strings.HasPrefix(got["PATH"], "/opt/helpers:") {
		t.Errorf("PATH %q does not start with the helper dir", got["PATH"])
	}
	if !strings.HasPrefix(got["HOME"], env.Dir()) || got["DOCKER_CONFIG"] != env.DockerConfigDir() {
		t.Errorf("HOME %q DOCKER_CONFIG %q", got["HOME"], got["DOCKER_CONFIG"])
	}
	if got["TMPDIR"] != "/override" {
		t.Errorf("WithEnv did not override TMPDIR: %q", got["TMPDIR"])
	}
}

func TestEnvConfigFiles(t *testing.T) {
	env := clients.NewEnv(t)
	env.CredHelper("127.0.0.1:5000", "pullsecret")
	env.Login("registry.example", "u", "p")
	for _, f := range []string{env.DockerConfigFile(), env.AuthFile()} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		if !strings.Contains(s, `"127.0.0.1:5000": "pullsecret"`) || !strings.Contains(s, `"auth": "dTpw"`) {
			t.Errorf("%s:\n%s", f, s)
		}
	}
}

// TestDaemonsStopCleanly checks that Stop leaves no process and no mount
// behind, and that a killed dockerd's leftovers are cleaned up.
func TestDaemonsStopCleanly(t *testing.T) {
	env := clients.NewEnv(t)
	d := clients.StartDockerd(t, env)
	pids := []int{d.PID(), d.Containerd.PID()}
	// SIGKILL dockerd: its containerd stays; Stop must still clean up.
	if err := syscall.Kill(d.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = d.Stop()
	time.Sleep(100 * time.Millisecond)
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("pid %d still alive after Stop", pid)
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, dir := range []string{d.DataRoot, d.ExecRoot} {
		if strings.Contains(string(mi), dir) {
			t.Errorf("mount under %s left", dir)
		}
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || !strings.HasPrefix(string(b[i:]), ") Z")
}
