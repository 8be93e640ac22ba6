// Command local runs a pullsecret cluster on this machine, as `make
// replicas` does: PostgreSQL, versitygw (one S3 bucket), N `pullsecret
// serve` replicas in front of public registries and of a private one in
// this process (alias "local", its pull secret stored), and a round-robin
// front on one address. It prints what runs and the commands to try, and tears it all
// down on SIGINT or SIGTERM.
//
//	go run ./deploy/local -bin bin [-n 3] [-listen 127.0.0.1:5080] [-dir DIR]
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pullsecret/pullsecret/internal/replicas"
	"github.com/pullsecret/pullsecret/registry"
)

// randomPassword is the private registry's password: 32 hex digits.
func randomPassword() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// publicUpstreams are aliases of public registries; docs/CONFIG.md's
// example uses the same names. "local" is added: a private registry in this
// process, so the recipe works without a network too.
func publicUpstreams() map[string]string {
	return map[string]string{"hub": "docker.io", "gh": "ghcr.io", "quay": "quay.io"}
}

// localImage is the image the local registry holds.
const localImage = "demo/app:v1"

func main() {
	bin := flag.String("bin", "bin", "folder with the built pullsecret binary (make build)")
	n := flag.Int("n", 3, "number of replicas")
	listen := flag.String("listen", "127.0.0.1:5080", "address of the round-robin front")
	dir := flag.String("dir", "", "work folder, kept at exit (default: a temporary folder, removed at exit)")
	basePort := flag.Int("base-port", 0, "put replica i on 127.0.0.1:BASE+i (default: free ports)")
	flag.Parse()
	if err := run(*bin, *dir, *listen, *n, *basePort); err != nil {
		fmt.Fprintln(os.Stderr, "replicas:", err)
		os.Exit(1)
	}
}

func run(bin, dir, listen string, n, basePort int) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Printf("starting a private registry, PostgreSQL, versitygw and %d replicas...\n", n)
	// The private registry: its password is random, goes into the cluster's
	// sealed store once (the pull secret "local" of project default) and is
	// printed nowhere.
	password, err := randomPassword()
	if err != nil {
		return err
	}
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"demo": password}))
	if err != nil {
		return fmt.Errorf("private registry: %w", err)
	}
	defer up.Close()
	repo, tag, _ := strings.Cut(localImage, ":")
	if _, err := up.SeedRandom(ctx, repo, tag, registry.Layers(3), registry.LayerSize(2<<20)); err != nil {
		return fmt.Errorf("private registry: %w", err)
	}
	upstreams := publicUpstreams()
	upstreams["local"] = up.Host()
	c, err := replicas.Start(ctx, replicas.Options{
		Bin:          bin,
		Dir:          dir,
		N:            n,
		Upstreams:    upstreams,
		AllowPrivate: []string{strings.Split(up.Host(), ":")[0]}, // its loopback address
		BasePort:     basePort,
		Front:        listen,
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil // interrupted while starting: Start has stopped what it started
		}
		return err
	}
	if _, err := c.CLI(ctx, password+"\n", "secret", "create", "local", "--registry", up.Host(),
		"--username", "demo", "--password-stdin", "--project", "default"); err != nil {
		_ = c.Close()
		return fmt.Errorf("pull secret of the private registry: %w", err)
	}
	describe(os.Stdout, c, bin, up.Host())
	<-ctx.Done()
	stop()
	fmt.Println("\nstopping the replicas, versitygw and PostgreSQL...")
	start := time.Now()
	if err := c.Close(); err != nil {
		return err
	}
	fmt.Printf("stopped in %s\n", time.Since(start).Round(time.Millisecond))
	return nil
}

// describe prints what runs and what to type next. No credential is
// printed: the user makes the token, the DSN and S3 keys stay in files.
func describe(w io.Writer, c *replicas.Cluster, bin, private string) {
	front := c.Front[len("http://"):]
	pullsecret := "pullsecret"
	if abs, err := filepath.Abs(filepath.Join(bin, "pullsecret")); err == nil {
		pullsecret = abs
	}
	fmt.Fprintf(w, "\nrunning:\n")
	fmt.Fprintf(w, "  front (round robin)  %s\n", c.Front)
	for i, u := range c.URLs {
		fmt.Fprintf(w, "  replica-%d            %s   log %s\n", i+1, u, c.Logs[i])
	}
	fmt.Fprintf(w, "  database             %s (password in %s)\n", c.Database, filepath.Join(c.Dir, "keys", "dsn"))
	fmt.Fprintf(w, "  bucket (versitygw)   %s\n", c.BucketDir)
	fmt.Fprintf(w, "  private registry     %s (htpasswd; holds %s; its password is only in the sealed store)\n", private, localImage)
	fmt.Fprintf(w, "  aliases              local -> %s, hub -> docker.io, gh -> ghcr.io, quay -> quay.io\n", private)
	fmt.Fprintf(w, "  work folder          %s\n", c.Dir)

	fmt.Fprintf(w, "\nin another shell:\n\n")
	fmt.Fprintf(w, "  export PULLSECRET_CONFIG=%s\n", c.ConfigFile)
	fmt.Fprintf(w, "  export PULLSECRET_KEY_FILE=%s\n", c.KeyFile)
	fmt.Fprintf(w, "  export PULLSECRET_HOME=%s\n\n", c.CLIHome)
	fmt.Fprintf(w, "  # project default has the pull secret \"local\" for the private registry:\n")
	fmt.Fprintf(w, "  %s secret list\n\n", pullsecret)
	fmt.Fprintf(w, "  # public images need no pull secret; for another private registry, store one:\n")
	fmt.Fprintf(w, "  printf '%%s' \"$REGISTRY_PASSWORD\" | %s secret create ghcr-acme \\\n", pullsecret)
	fmt.Fprintf(w, "      --registry ghcr.io/acme --username acme-bot --password-stdin\n\n")
	fmt.Fprintf(w, "  TOKEN=$(%s token create --project default --scope pull --ttl 24h)\n", pullsecret)
	fmt.Fprintf(w, "  echo \"$TOKEN\" | crane auth login %s -u ci --password-stdin\n", front)
	fmt.Fprintf(w, "  crane pull --insecure %s/local/%s app.tar   # <front>/<alias>/<repo>:<tag>; no network needed\n", front, localImage)
	fmt.Fprintf(w, "  crane pull --insecure %s/hub/library/alpine:latest alpine.tar\n", front)
	fmt.Fprintf(w, "  # or: echo \"$TOKEN\" | docker login %s -u ci --password-stdin\n", front)
	fmt.Fprintf(w, "  #     docker pull %s/hub/library/alpine:latest\n", front)
	fmt.Fprintf(w, "  curl -s %s/metrics | grep pullsecret_cache   # each replica has its own\n\n", c.URLs[0])
	fmt.Fprintf(w, "Ctrl-C stops everything.\n")
}
