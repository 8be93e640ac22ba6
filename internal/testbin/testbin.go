// Package testbin builds the project's commands for tests that run them as
// real processes, the way clients and operators do.
package testbin

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Commands are the project's binaries by name.
var Commands = []string{"pullsecret", "docker-credential-pullsecret", "pullsecret-credential-provider"}

// Build compiles the named commands (all of Commands when none are named)
// into a fresh folder and returns it. The Go build cache makes repeated
// builds cheap.
func Build(t testing.TB, names ...string) string {
	t.Helper()
	if len(names) == 0 {
		names = Commands
	}
	dir := t.TempDir()
	root := moduleRoot(t)
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	for _, n := range names {
		args = append(args, "./cmd/"+n)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	// As `make build` does: static binaries.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return dir
}

func moduleRoot(t testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("testbin: cannot find the module root")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}
