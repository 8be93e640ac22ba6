package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

// ecrRefHelper is the reference helper, awslabs/amazon-ecr-credential-helper.
const (
	ecrRefHelper  = "docker-credential-ecr-login"
	ecrRefInstall = "go install github.com/awslabs/amazon-ecr-credential-helper/ecr-login/cli/docker-credential-ecr-login@v0.12.0"
	ecrBenchRuns  = 200
)

// helperECR times a whole-process `get` of an ECR registry, ours
// (docker-credential-pullsecret, AWS exchange in the pullsecret program)
// against the reference helper, both talking to the same fake ECR endpoint
// (AWS_ENDPOINT_URL_ECR), interleaved run by run: with a warm token cache,
// and with a cold one (the cache file removed before each run, untimed).
func (b *bench) helperECR(ctx context.Context) error {
	ref, err := findRefHelper()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "pullsecret-bench-ecr-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin, err := filepath.Abs(b.bin)
	if err != nil {
		return err
	}
	ours := filepath.Join(bin, "docker-credential-pullsecret")
	for _, p := range []string{ours, filepath.Join(bin, "pullsecret")} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%w (run make build)", err)
		}
	}
	floor := filepath.Join(tmp, "floor")
	if out, err := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", floor, "./internal/bench/floor").CombinedOutput(); err != nil {
		return fmt.Errorf("build floor: %v\n%s", err, out)
	}

	const (
		host      = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
		keyID     = "AKIAFAKEBENCH0000001"
		secretKey = "bench-secret-key"
	)
	fake := registry.NewFakeECR()
	defer fake.Close()
	fake.AddUser(keyID, secretKey, "arn:aws:iam::123456789012:user/bench")

	home := filepath.Join(tmp, "home")
	store, err := secret.Open(home)
	if err != nil {
		return err
	}
	// The same 100-secret store as the helper-get benchmark, plus the ECR one.
	for i := range 100 {
		sec := secret.Secret{Name: fmt.Sprintf("s%03d", i), Kind: secret.Basic,
			Registries: []secret.Pattern{secret.Pattern(fmt.Sprintf("reg%03d.example:5000/team", i))}}
		if _, err := store.Create(ctx, sec, secret.Value{Username: "bot", Password: fmt.Sprintf("pw-%d", i)}); err != nil {
			return err
		}
	}
	if _, err := store.Create(ctx, secret.Secret{Name: "ecr", Kind: secret.ECR, Registries: []secret.Pattern{host}},
		secret.Value{AWS: &secret.AWSValue{AccessKeyID: keyID, SecretAccessKey: secretKey}}); err != nil {
		return err
	}
	awsHome := filepath.Join(tmp, "aws")
	refCache := filepath.Join(tmp, "ecr-login-cache")
	base := []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + awsHome,
		"AWS_CONFIG_FILE=" + filepath.Join(awsHome, "config"),
		"AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(awsHome, "credentials"),
		"AWS_EC2_METADATA_DISABLED=true",
		"AWS_ENDPOINT_URL_ECR=" + fake.URL(),
	}
	// Each helper gets its credentials the way it is meant to: ours from
	// the sealed secret, the reference from the environment.
	oursEnv := append(append([]string{}, base...), "PULLSECRET_HOME="+home)
	refEnv := append(append([]string{}, base...), "AWS_ACCESS_KEY_ID="+keyID, "AWS_SECRET_ACCESS_KEY="+secretKey, "AWS_ECR_CACHE_DIR="+refCache)
	get := func(path string, env []string) func() *exec.Cmd {
		return func() *exec.Cmd {
			c := exec.Command(path, "get")
			c.Stdin = strings.NewReader(host + "\n")
			c.Env = env
			return c
		}
	}
	cmds := map[string]func() *exec.Cmd{
		"floor":      func() *exec.Cmd { return exec.Command(floor) },
		"pullsecret": get(ours, oursEnv),
		"ecr-login":  get(ref, refEnv),
	}
	for _, name := range []string{"pullsecret", "ecr-login"} {
		if err := checkECRGet(cmds[name](), fake); err != nil {
			return fmt.Errorf("%s get: %w", name, err)
		}
	}
	coldReset := map[string]func(){
		"pullsecret": func() { os.Remove(filepath.Join(home, "ecr-tokens.json")) },
		"ecr-login":  func() { os.RemoveAll(refCache) },
	}

	calls := fake.Calls(registry.APIGetAuthorizationToken)
	warm, err := timeRuns(cmds, []string{"floor", "pullsecret", "ecr-login"}, nil, ecrBenchRuns)
	if err != nil {
		return err
	}
	if n := fake.Calls(registry.APIGetAuthorizationToken) - calls; n != 0 {
		return fmt.Errorf("warm runs made %d GetAuthorizationToken calls", n)
	}
	calls = fake.Calls(registry.APIGetAuthorizationToken)
	cold, err := timeRuns(cmds, []string{"pullsecret", "ecr-login"}, coldReset, ecrBenchRuns)
	if err != nil {
		return err
	}
	if n := fake.Calls(registry.APIGetAuthorizationToken) - calls; n != 2*(ecrBenchRuns+10) {
		return fmt.Errorf("cold runs made %d GetAuthorizationToken calls, want %d", n, 2*(ecrBenchRuns+10))
	}

	fmt.Printf("runs: %d each, interleaved; same fake ECR endpoint; store: 101 secrets\n", ecrBenchRuns)
	row := func(label string, d []time.Duration) {
		fmt.Printf("%-44s p50 %8s  p95 %8s\n", label, ms(pct(d, 50)), ms(pct(d, 95)))
	}
	ratio := func(label string, a, b []time.Duration, target string) {
		fmt.Printf("%-44s p50 %7.2fx  p95 %7.2fx%s\n", label,
			float64(pct(a, 50))/float64(pct(b, 50)), float64(pct(a, 95))/float64(pct(b, 95)), target)
	}
	row("floor (Go binary, fixed JSON)", warm["floor"])
	row("warm: docker-credential-pullsecret get", warm["pullsecret"])
	row("warm: docker-credential-ecr-login get", warm["ecr-login"])
	row("cold: docker-credential-pullsecret get", cold["pullsecret"])
	row("cold: docker-credential-ecr-login get", cold["ecr-login"])
	ratio("ratio warm pullsecret/ecr-login", warm["pullsecret"], warm["ecr-login"], "   (target p50 <= 0.5x)")
	ratio("ratio cold pullsecret/ecr-login", cold["pullsecret"], cold["ecr-login"], "")
	ratio("ratio warm pullsecret/floor", warm["pullsecret"], warm["floor"], "")
	return nil
}

// timeRuns runs the named commands in turn, runs times each after ten
// warm-up rounds, calling reset[name] (untimed) before each run.
func timeRuns(cmds map[string]func() *exec.Cmd, order []string, reset map[string]func(), runs int) (map[string][]time.Duration, error) {
	times := map[string][]time.Duration{}
	for i := 0; i < runs+10; i++ {
		for _, name := range order {
			if r := reset[name]; r != nil {
				r()
			}
			c := cmds[name]()
			var out bytes.Buffer
			c.Stdout = &out
			start := time.Now()
			if err := c.Run(); err != nil {
				return nil, fmt.Errorf("%s: %w: %s", name, err, out.String())
			}
			if i >= 10 {
				times[name] = append(times[name], time.Since(start))
			}
		}
	}
	return times, nil
}

func checkECRGet(c *exec.Cmd, fake *registry.FakeECR) error {
	var stderr bytes.Buffer
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		return fmt.Errorf("%v: %s %s", err, out, stderr.String())
	}
	var cred struct{ Username, Secret string }
	if err := json.Unmarshal(out, &cred); err != nil || cred.Username != "AWS" || !fake.Valid(cred.Secret) {
		return fmt.Errorf("not a valid token from the fake ECR: %s", out)
	}
	return nil
}

func findRefHelper() (string, error) {
	if p, err := exec.LookPath(ecrRefHelper); err == nil {
		return p, nil
	}
	gobin := os.Getenv("GOBIN")
	if gobin == "" {
		out, err := exec.Command("go", "env", "GOPATH").Output()
		if err == nil {
			gobin = filepath.Join(strings.TrimSpace(string(out)), "bin")
		}
	}
	p := filepath.Join(gobin, ecrRefHelper)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found: install it with %s", ecrRefHelper, ecrRefInstall)
	}
	return p, nil
}
