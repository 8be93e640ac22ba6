// Command conformance runs the OCI distribution-spec conformance suite
// (read-only pull workflow) against `pullsecret serve` started as a real
// process in front of a private in-process upstream registry. `make
// conformance` runs it; it exits non-zero unless the suite reports Pass.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/pullsecret/pullsecret/registry"
)

func main() {
	bin := flag.String("bin", "bin", "folder with the pullsecret binary")
	suite := flag.String("suite", "bin/oci-conformance", "the conformance suite program")
	flag.Parse()
	if err := run(*bin, *suite); err != nil {
		fmt.Fprintln(os.Stderr, "conformance:", err)
		os.Exit(1)
	}
}

func run(bin, suite string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tmp, err := os.MkdirTemp("", "pullsecret-conformance-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	// A private upstream with an image and an index of two images.
	const user, pass = "conformance-bot", "conformance-upstream-pw-4e1d"
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{user: pass}), registry.WithFilesystem(filepath.Join(tmp, "upstream")))
	if err != nil {
		return err
	}
	defer up.Close()
	img, err := up.SeedRandom(ctx, "conformance/repo1", "v1", registry.Layers(2), registry.LayerSize(64<<10))
	if err != nil {
		return err
	}
	img2, err := random.Image(32<<10, 1)
	if err != nil {
		return err
	}
	idx := mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img}, mutate.IndexAddendum{Add: img2})
	if err := up.SeedIndex(ctx, "conformance/repo1", "multi", idx); err != nil {
		return err
	}
	var manifests, blobs []string
	d1, _ := img.Digest()
	di, _ := idx.Digest()
	manifests = append(manifests, d1.String(), di.String())
	cfgName, _ := img.ConfigName()
	blobs = append(blobs, cfgName.String())
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		blobs = append(blobs, d.String())
	}

	// pullsecret: a pull secret for the upstream, a pull token, the server.
	home := filepath.Join(tmp, "home")
	env := append(os.Environ(), "PULLSECRET_HOME="+home)
	ps := filepath.Join(bin, "pullsecret")
	if _, err := command(ctx, env, pass, ps, "secret", "create", "upstream", "--registry", up.Addr(), "--username", user, "--password-stdin"); err != nil {
		return err
	}
	tok, err := command(ctx, env, "", ps, "token", "create", "--project", "default", "--scope", "pull", "--ttl", "1h", "--name", "conformance")
	if err != nil {
		return err
	}
	tok = strings.TrimSpace(tok)
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	conf := filepath.Join(tmp, "serve.yaml")
	yaml := fmt.Sprintf("listen: %s\nallow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\nlog:\n  level: warn\n", addr, up.Addr())
	if err := os.WriteFile(conf, []byte(yaml), 0o600); err != nil {
		return err
	}
	var serveLog bytes.Buffer
	serve := exec.CommandContext(ctx, ps, "serve", "--config", conf)
	serve.Env, serve.Stdout, serve.Stderr = env, &serveLog, &serveLog
	if err := serve.Start(); err != nil {
		return err
	}
	defer func() { serve.Process.Signal(os.Interrupt); serve.Wait() }()
	if err := waitReady(ctx, "http://"+addr+"/readyz"); err != nil {
		return fmt.Errorf("%w\n%s", err, serveLog.String())
	}

	// The suite, read-only, through the proxy with the pull token.
	results := filepath.Join(tmp, "results")
	cmd := exec.CommandContext(ctx, suite)
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(),
		"OCI_REGISTRY="+addr, "OCI_TLS=disabled",
		"OCI_REPO1=up/conformance/repo1", "OCI_REPO2=up/conformance/repo1",
		"OCI_USERNAME=conformance", "OCI_PASSWORD="+tok,
		"OCI_API_PUSH=false", "OCI_API_BLOBS_DELETE=false", "OCI_API_MANIFESTS_DELETE=false", "OCI_API_TAGS_DELETE=false",
		"OCI_API_REFERRER=false",
		"OCI_RO_DATA_TAGS=v1 multi",
		"OCI_RO_DATA_MANIFESTS="+strings.Join(manifests, " "),
		"OCI_RO_DATA_BLOBS="+strings.Join(blobs, " "),
		"OCI_FILTER_TEST=OCI Conformance Test/read-only",
		"OCI_RESULTS_DIR="+results,
	)
	out, err := cmd.CombinedOutput()
	os.Stdout.Write(out)
	if bytes.Contains(serveLog.Bytes(), []byte(pass)) || bytes.Contains(out, []byte(pass)) {
		return errors.New("the upstream password appeared in the output")
	}
	if err != nil {
		return fmt.Errorf("suite: %w", err)
	}
	// A configuration error still exits 0: only the result line counts.
	if !bytes.Contains(out, []byte("OCI Conformance Result: Pass")) {
		return fmt.Errorf("the suite did not report Pass (results in %s were removed; rerun to inspect)\nserver log:\n%s", results, serveLog.String())
	}
	fmt.Println("conformance: read-only pull workflow through the proxy: Pass")
	return nil
}

func command(ctx context.Context, env []string, stdin string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func waitReady(ctx context.Context, url string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("pullsecret serve not ready at %s", url)
}
