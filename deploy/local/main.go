// Command local runs a pullsecret cluster on this machine, as `make
// replicas` does: PostgreSQL, versitygw (one S3 bucket), N `pullsecret
// serve` replicas in front of public registries, and a round-robin front on
// one address. It prints what runs and the commands to try, and tears it all
// down on SIGINT or SIGTERM.
//
//	go run ./deploy/local -bin bin [-n 3] [-listen 127.0.0.1:5080] [-dir DIR]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/pullsecret/pullsecret/internal/replicas"
)

// upstreams are the aliases every replica serves; docs/CONFIG.md's
// example uses the same names.
var upstreams = map[string]string{
	"hub":  "docker.io",
	"gh":   "ghcr.io",
	"quay": "quay.io",
}

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
	fmt.Printf("starting PostgreSQL, versitygw and %d replicas...\n", n)
	c, err := replicas.Start(ctx, replicas.Options{
		Bin:       bin,
		Dir:       dir,
		N:         n,
		Upstreams: upstreams,
		BasePort:  basePort,
		Front:     listen,
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil // interrupted while starting: Start has stopped what it started
		}
		return err
	}
	describe(os.Stdout, c, bin)
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
func describe(w io.Writer, c *replicas.Cluster, bin string) {
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
	fmt.Fprintf(w, "  aliases              hub -> docker.io, gh -> ghcr.io, quay -> quay.io\n")
	fmt.Fprintf(w, "  work folder          %s\n", c.Dir)

	fmt.Fprintf(w, "\nin another shell:\n\n")
	fmt.Fprintf(w, "  export PULLSECRET_CONFIG=%s\n", c.ConfigFile)
	fmt.Fprintf(w, "  export PULLSECRET_KEY_FILE=%s\n", c.KeyFile)
	fmt.Fprintf(w, "  export PULLSECRET_HOME=%s\n\n", c.CLIHome)
	fmt.Fprintf(w, "  # public images need no pull secret; for a private registry, store one:\n")
	fmt.Fprintf(w, "  printf '%%s' \"$REGISTRY_PASSWORD\" | %s secret create ghcr-acme \\\n", pullsecret)
	fmt.Fprintf(w, "      --registry ghcr.io/acme --username acme-bot --password-stdin\n\n")
	fmt.Fprintf(w, "  TOKEN=$(%s token create --project default --scope pull --ttl 24h)\n", pullsecret)
	fmt.Fprintf(w, "  echo \"$TOKEN\" | crane auth login %s -u ci --password-stdin\n", front)
	fmt.Fprintf(w, "  crane pull --insecure %s/hub/library/alpine:latest alpine.tar   # <front>/<alias>/<repo>\n", front)
	fmt.Fprintf(w, "  # or: echo \"$TOKEN\" | docker login %s -u ci --password-stdin\n", front)
	fmt.Fprintf(w, "  #     docker pull %s/hub/library/alpine:latest\n", front)
	fmt.Fprintf(w, "  curl -s %s/metrics | grep pullsecret_cache   # each replica has its own\n\n", c.URLs[0])
	fmt.Fprintf(w, "Ctrl-C stops everything.\n")
}
