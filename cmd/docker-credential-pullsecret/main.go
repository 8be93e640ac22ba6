// Command docker-credential-pullsecret is a docker-credential-helpers
// helper that resolves pull secrets at pull time. Name it in a client's
// config.json (credHelpers or credsStore) or auth.json.
//
// With PULLSECRET_SERVER set it runs in remote mode: `get` asks that
// pullsecret server's credential API with the project token of
// PULLSECRET_TOKEN (or the file PULLSECRET_TOKEN_FILE; PULLSECRET_CA_FILE
// adds a CA to trust), and `store`/`erase` are refused.
//
// ECR secrets are exchanged for registry tokens that are kept, sealed, in
// $PULLSECRET_HOME/ecr-tokens.json until they near expiry
// (PULLSECRET_ECR_CACHE=off turns that off; PULLSECRET_ECR_REFRESH_MARGIN,
// a Go duration, sets how much life a token must have left, default 1h).
// The exchange itself, which needs the AWS SDK, runs in the pullsecret
// program (found next to this one, else on PATH, or named by
// PULLSECRET_ECR_EXCHANGER), so that this program, which starts once per
// pull, links no AWS code.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/pullsecret/pullsecret/credhelper"
	"github.com/pullsecret/pullsecret/secret"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	credentials.Name = "docker-credential-pullsecret"
	credentials.Package = "github.com/pullsecret/pullsecret"
	credentials.Version = version

	if os.Getenv("PULLSECRET_SERVER") != "" {
		// Remote mode runs in the pullsecret program, which links the HTTP
		// client this one leaves out to start fast in local mode.
		execRemote()
		return
	}
	store, err := secret.OpenFromEnv(os.Getenv, ecrOption(os.Getenv))
	if err != nil {
		// The protocol reads errors from stdout; exit 1.
		fmt.Fprintln(os.Stdout, "pullsecret:", err)
		os.Exit(1)
	}
	credentials.Serve(credhelper.NewLocal(store, credhelper.WithProject(os.Getenv("PULLSECRET_PROJECT"))))
}

// execRemote replaces this process with `pullsecret __credential-helper
// VERB`, which asks the server; stdin, stdout and the exit code pass
// through untouched.
func execRemote() {
	if len(os.Args) != 2 {
		fmt.Fprintf(os.Stdout, "Usage: %s <store|get|erase|list|version>\n", credentials.Name)
		os.Exit(1)
	}
	path, err := pullsecretProgram(os.Getenv, "PULLSECRET_PROGRAM")
	if err != nil {
		fmt.Fprintln(os.Stdout, "pullsecret: remote mode (PULLSECRET_SERVER) needs the pullsecret program next to docker-credential-pullsecret or on PATH (or PULLSECRET_PROGRAM)")
		os.Exit(1)
	}
	err = syscall.Exec(path, []string{path, "__credential-helper", os.Args[1]}, os.Environ())
	fmt.Fprintf(os.Stdout, "pullsecret: run %s: %v\n", path, err)
	os.Exit(1)
}

// ecrOption registers the ECR provider. Nothing here touches AWS or the
// disk: that happens only when an ECR secret is resolved.
func ecrOption(getenv func(string) string) secret.Option {
	// Warnings (a failed refresh served from cache) go to stderr, which
	// callers show to the user; they never hold a secret.
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	opts := []secret.CacheOption{secret.WithCacheLogger(log)}
	if d, err := time.ParseDuration(getenv("PULLSECRET_ECR_REFRESH_MARGIN")); err == nil && d > 0 {
		opts = append(opts, secret.WithRefreshMargin(d))
	}
	ex := &lazyExchanger{getenv: getenv}
	if getenv("PULLSECRET_ECR_CACHE") == "off" {
		p := secret.NewECRProvider(ex, secret.WithTokenCache(secret.NewMemoryTokenCache(opts...)))
		return secret.WithProvider(secret.ECR, p)
	}
	return secret.WithDiskCachedECR(ex, opts...)
}

// lazyExchanger finds the exchange program on first use.
type lazyExchanger struct {
	getenv func(string) string
	once   sync.Once
	ex     *secret.ExecExchanger
	err    error
}

func (l *lazyExchanger) Exchange(ctx context.Context, r secret.ECRRequest) (secret.ECRToken, error) {
	l.once.Do(func() {
		var path string
		path, l.err = exchangeProgram(l.getenv)
		l.ex = &secret.ExecExchanger{Path: path, Stderr: os.Stderr}
	})
	if l.err != nil {
		return secret.ECRToken{}, l.err
	}
	return l.ex.Exchange(ctx, r)
}

// exchangeProgram finds the pullsecret program for ECR exchanges.
func exchangeProgram(getenv func(string) string) (string, error) {
	p, err := pullsecretProgram(getenv, "PULLSECRET_ECR_EXCHANGER")
	if err != nil {
		return "", &secret.ECRError{Kind: secret.ErrAWSFailed,
			Detail: "exchanging AWS credentials for an ECR token needs the pullsecret program next to docker-credential-pullsecret or on PATH (or PULLSECRET_ECR_EXCHANGER)"}
	}
	return p, nil
}

// pullsecretProgram finds the pullsecret program: the file named by the
// environment variable env, else next to this executable, else on PATH.
func pullsecretProgram(getenv func(string) string, env string) (string, error) {
	if p := getenv(env); p != "" {
		return p, nil
	}
	if self, err := os.Executable(); err == nil {
		if real, err := filepath.EvalSymlinks(self); err == nil {
			self = real
		}
		p := filepath.Join(filepath.Dir(self), "pullsecret")
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return exec.LookPath("pullsecret")
}
