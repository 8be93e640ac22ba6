// Command bench runs pullsecret's benchmarks side by side with their
// baselines in one run and prints ratios, since the machines it runs on are
// shared and noisy. `make bench` runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pullsecret/pullsecret/secret"
)

func main() {
	bin := flag.String("bin", "bin", "folder with the built binaries")
	runs := flag.Int("runs", 300, "runs per measured command")
	only := flag.String("only", "", "run only benchmarks whose name contains this")
	cacheProfile := flag.String("cache-cpuprofile", "", "write a CPU profile of the cache benchmark (labels phase, side) to this file")
	flag.Parse()
	ctx := context.Background()
	b := &bench{bin: *bin, runs: *runs, cacheProfile: *cacheProfile}
	for _, s := range []struct {
		name string
		fn   func(context.Context) error
	}{
		{"helper-get", b.helperGet},
		{"helper-ecr", b.helperECR},
		{"proxy", b.proxyBench},
		{"cache", b.cacheBench},
		{"replicas", b.replicasBench},
	} {
		if *only != "" && !strings.Contains(s.name, *only) {
			continue
		}
		fmt.Printf("== %s\n", s.name)
		if err := s.fn(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "bench %s: %v\n", s.name, err)
			os.Exit(1)
		}
	}
}

type bench struct {
	bin  string
	runs int
	// cacheProfile, when set, is where the cache benchmark writes a CPU
	// profile (goroutines labelled by phase and side).
	cacheProfile string
}

// helperGet times `docker-credential-pullsecret get` as a whole process
// against a store of 100 secrets, interleaved run by run with a floor binary
// that only prints fixed JSON.
func (b *bench) helperGet(ctx context.Context) error {
	tmp, err := os.MkdirTemp("", "pullsecret-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	floor := filepath.Join(tmp, "floor")
	if out, err := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", floor, "./internal/bench/floor").CombinedOutput(); err != nil {
		return fmt.Errorf("build floor: %v\n%s", err, out)
	}
	helper, err := filepath.Abs(filepath.Join(b.bin, "docker-credential-pullsecret"))
	if err != nil {
		return err
	}
	home := filepath.Join(tmp, "home")
	store, err := secret.Open(home)
	if err != nil {
		return err
	}
	for i := range 100 {
		sec := secret.Secret{Name: fmt.Sprintf("s%03d", i), Kind: secret.Basic,
			Registries: []secret.Pattern{secret.Pattern(fmt.Sprintf("reg%03d.example:5000/team", i))}}
		if _, err := store.Create(ctx, sec, secret.Value{Username: "bot", Password: fmt.Sprintf("pw-%d", i)}); err != nil {
			return err
		}
	}
	env := append(os.Environ(), "PULLSECRET_HOME="+home)
	cmds := map[string]func() *exec.Cmd{
		"floor": func() *exec.Cmd { return exec.Command(floor) },
		"helper": func() *exec.Cmd {
			c := exec.Command(helper, "get")
			c.Stdin = strings.NewReader("reg050.example:5000/team/app\n")
			c.Env = env
			return c
		},
	}
	// Check the helper answers before timing it.
	if out, err := cmds["helper"]().Output(); err != nil || !strings.Contains(string(out), "pw-50") {
		return fmt.Errorf("helper get: %v: %s", err, out)
	}
	times := map[string][]time.Duration{}
	for i := 0; i < b.runs+10; i++ {
		for _, name := range []string{"floor", "helper"} {
			c := cmds[name]()
			start := time.Now()
			if err := c.Run(); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if i >= 10 { // warm-up
				times[name] = append(times[name], time.Since(start))
			}
		}
	}
	f50, f95 := pct(times["floor"], 50), pct(times["floor"], 95)
	h50, h95 := pct(times["helper"], 50), pct(times["helper"], 95)
	fmt.Printf("runs: %d each, interleaved; store: 100 secrets\n", b.runs)
	fmt.Printf("%-34s p50 %8s  p95 %8s\n", "floor (Go binary, fixed JSON)", ms(f50), ms(f95))
	fmt.Printf("%-34s p50 %8s  p95 %8s\n", "docker-credential-pullsecret get", ms(h50), ms(h95))
	fmt.Printf("ratio helper/floor                 p50 %7.2fx  p95 %7.2fx   (target p50 < 10 ms and < 2x)\n",
		float64(h50)/float64(f50), float64(h95)/float64(f95))
	return nil
}

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[(len(s)-1)*p/100]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/1e6) }
