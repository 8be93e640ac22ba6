package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

func demoCommand() *command {
	return &command{
		summary: "Show the whole flow on a private in-process registry (make run)",
		usage:   demoUsage,
		run:     (*cli).demo,
	}
}

const demoUsage = `Usage: pullsecret demo [--keep] [--verbose]

Run the main job end to end, on embedded defaults in a temporary data
folder, without touching $PULLSECRET_HOME or the network:

  1. start a private upstream registry (in-process distribution, htpasswd)
     and push an image to it;
  2. store a pull secret for it in project "demo" (sealed, AES-256-GCM);
  3. create a pull token for project "demo";
  4. serve the proxy on a free loopback port;
  5. pull the image through the proxy as a real client does (401, token
     flow with the pull token, manifests and layers) and verify digests;
  6. print how to point Docker, podman and containerd at the proxy.

The upstream password is random and never printed.

Flags:
  --keep      keep serving (and print the pull token) until Ctrl-C
  --verbose   print the proxy's request log
`

func (c *cli) demo(args []string) error {
	fs := newFlagSet("demo")
	keep := fs.Bool("keep", false, "")
	verbose := fs.Bool("verbose", false, "")
	pos, err := c.parseFlags(fs, args, demoUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, demoUsage); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(c.ctx)
	defer cancel()
	out := c.stdout
	step := 0
	say := func(format string, a ...any) {
		step++
		fmt.Fprintf(out, "%d. "+format+"\n", append([]any{step}, a...)...)
	}

	home, err := os.MkdirTemp("", "pullsecret-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(home)

	// 1. A private upstream with a seeded image.
	user, pass := "demo-robot", "demo-upstream-pw-"+randHex(12)
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{user: pass}))
	if err != nil {
		return fmt.Errorf("start the upstream registry: %w", err)
	}
	defer up.Close()
	img, err := up.SeedRandom(ctx, "acme/app", "v1", registry.Layers(2), registry.LayerSize(256<<10))
	if err != nil {
		return err
	}
	want, err := img.Digest()
	if err != nil {
		return err
	}
	say("Started a private upstream registry at %s (htpasswd user %s) and pushed acme/app:v1 (%s).", up.Host(), user, short(want.String()))
	if resp, err := http.Get("http://" + up.Host() + "/v2/acme/app/manifests/v1"); err == nil {
		resp.Body.Close()
		fmt.Fprintf(out, "   Without credentials the upstream answers %d.\n", resp.StatusCode)
	}

	// 2. The pull secret.
	store, err := secret.Open(home)
	if err != nil {
		return err
	}
	pat, err := secret.ParsePattern(up.Host())
	if err != nil {
		return err
	}
	if _, err := store.Create(ctx, secret.Secret{Project: "demo", Name: "upstream", Kind: secret.Basic, Registries: []secret.Pattern{pat}},
		secret.Value{Username: user, Password: pass}); err != nil {
		return err
	}
	say("Stored pull secret demo/upstream for %s, sealed in %s (the password never leaves it).", up.Host(), store.Path())

	// 3. A pull token.
	tokens, err := proxy.NewTokenStore(home)
	if err != nil {
		return err
	}
	tok, info, err := tokens.Create(ctx, proxy.TokenSpec{Project: "demo", Name: "demo", Scopes: []string{proxy.ScopePull}, TTL: 24 * time.Hour})
	if err != nil {
		return err
	}
	say("Created pull token %s for project demo (scope pull, stored as a hash).", info.ID)

	// 4. The proxy.
	cfg := proxy.DefaultConfig()
	cfg.Home = home
	cfg.Listen = "127.0.0.1:0"
	cfg.Aliases = map[string]string{"upstream": up.Host()}
	if err := cfg.AllowPrivateUpstreams.Set([]string{"127.0.0.1/32"}); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	var logBuf syncWriter
	logOut := io.Writer(&logBuf)
	level := "warn"
	if *verbose || *keep {
		level = "info"
		logOut = c.stderr
	}
	cfg.Log.Level = level
	ps, err := c.newProxyServer(cfg, proxy.NewLogger(logOut, cfg.Log))
	if err != nil {
		return err
	}
	defer ps.close()
	ln, err := ps.srv.Listen()
	if err != nil {
		return err
	}
	proxyHost := ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- ps.srv.Serve(ctx, ln) }()
	say("Serving the proxy on http://%s (upstream alias \"upstream\" -> %s; private upstreams allowed: 127.0.0.1/32).", proxyHost, up.Host())

	// 5. Pull through it, as a client.
	ref, err := name.ParseReference(proxyHost+"/upstream/acme/app:v1", name.Insecure)
	if err != nil {
		return err
	}
	start := time.Now()
	got, err := remote.Image(ref, remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: "demo", Password: tok}))
	if err != nil {
		return fmt.Errorf("pull through the proxy: %w", err)
	}
	gd, err := got.Digest()
	if err != nil {
		return err
	}
	if gd != want {
		return fmt.Errorf("pulled %s, the upstream has %s", gd, want)
	}
	layers, err := got.Layers()
	if err != nil {
		return err
	}
	var total int64
	for _, l := range layers {
		rc, err := l.Compressed() // the client verifies each layer's digest
		if err != nil {
			return err
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("layer: %w", err)
		}
		total += n
	}
	say("Pulled %s through the proxy in %s: manifest %s and %d layers (%d KiB), every digest verified.",
		ref, time.Since(start).Round(time.Millisecond), short(gd.String()), len(layers), total>>10)
	fmt.Fprintf(out, "   The client held only the pull token; the proxy resolved the pull secret at pull time.\n")

	// A token of another project reaches nothing.
	other, _, err := tokens.Create(ctx, proxy.TokenSpec{Project: "other", Scopes: []string{proxy.ScopePull}, TTL: time.Hour})
	if err != nil {
		return err
	}
	if _, err := remote.Image(ref, remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: "other", Password: other})); err == nil {
		return errors.New("a token of project other pulled project demo's image")
	} else {
		say("A token of project \"other\" is refused: %s", firstLine(err.Error()))
	}

	// 6. How to use it.
	say("Point clients at the proxy:")
	fmt.Fprint(out, indent(clientHowTo(proxyHost, up.Host()), "   "))
	if strings.Contains(logBuf.String(), pass) {
		return errors.New("internal error: the upstream password reached the proxy log")
	}

	if !*keep {
		cancel()
		if err := <-served; err != nil {
			return err
		}
		fmt.Fprintln(out, "Done. Run 'pullsecret demo --keep' to keep the proxy serving and try these commands.")
		return nil
	}
	fmt.Fprintf(out, "\nServing until Ctrl-C. Pull token (project demo, 24h):\n  export PULLSECRET_TOKEN=%s\n", tok)
	err = <-served
	if err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func clientHowTo(proxyHost, upstream string) string {
	return fmt.Sprintf(`Docker (127.0.0.0/8 is an insecure registry by default):
  echo "$PULLSECRET_TOKEN" | docker login %[1]s -u demo --password-stdin
  docker pull %[1]s/upstream/acme/app:v1
podman / skopeo:
  echo "$PULLSECRET_TOKEN" | podman login --tls-verify=false %[1]s -u demo --password-stdin
  podman pull --tls-verify=false %[1]s/upstream/acme/app:v1
crane:
  crane auth login %[1]s -u demo -p "$PULLSECRET_TOKEN"
  crane pull --insecure %[1]s/upstream/acme/app:v1 app.tar
containerd, with the proxy as a mirror of the upstream (requests carry ?ns=%[2]s):
  mkdir -p /etc/containerd/certs.d/%[2]s
  cat > /etc/containerd/certs.d/%[2]s/hosts.toml <<EOF
  server = "http://%[2]s"
  [host."http://%[1]s"]
    capabilities = ["pull", "resolve"]
    [host."http://%[1]s".header]
      Authorization = "Basic $(printf 'demo:%%s' "$PULLSECRET_TOKEN" | base64 -w0)"
  EOF
  ctr images pull --hosts-dir /etc/containerd/certs.d %[2]s/acme/app:v1
curl:
  curl -u "demo:$PULLSECRET_TOKEN" http://%[1]s/v2/upstream/acme/app/tags/list
`, proxyHost, upstream)
}

func short(d string) string {
	if len(d) > 19 {
		return d[:19] + "…"
	}
	return d
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// syncWriter is a concurrency-safe buffer for the demo's quiet log.
type syncWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
