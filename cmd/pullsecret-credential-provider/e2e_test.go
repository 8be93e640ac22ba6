package main

// The plugin against a real `pullsecret serve`: kubelet's request on stdin,
// the service account token verified by the server, the answer decoded by
// kubelet's strict codec, and the credential answered used for a real pull.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/credhelper/kubelet"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	cpv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
)

const (
	e2eIssuer   = "https://kubernetes.default.svc.cluster.local"
	e2eAudience = "pullsecret"
	e2eAlphaPW  = "canary-kubelet-alpha-93c1"
	e2eBetaPW   = "canary-kubelet-beta-2d7e"
)

func TestE2EKubeletPluginAgainstServe(t *testing.T) {
	if testing.Short() {
		t.Skip("end to end; not in -short")
	}
	t.Parallel()
	ctx := context.Background()
	bin := testbin.Build(t)
	reg, err := registry.Start(ctx, registry.WithTokenAuth(map[string]string{"alpha": e2eAlphaPW, "beta": e2eBetaPW}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := reg.SeedRandom(ctx, "team/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()
	home := filepath.Join(t.TempDir(), "home")
	ps := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.Command(filepath.Join(bin, "pullsecret"), args...)
		cmd.Env = []string{"PULLSECRET_HOME=" + home, "HOME=" + t.TempDir(), "PATH=/usr/bin:/bin"}
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("pullsecret %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	// Two projects, each with its own credential for the same registry.
	ps(e2eAlphaPW+"\n", "secret", "create", "reg", "--registry", reg.Addr()+"/team", "--username", "alpha", "--password-stdin", "--project", "alpha")
	ps(e2eBetaPW+"\n", "secret", "create", "reg", "--registry", reg.Addr()+"/team", "--username", "beta", "--password-stdin", "--project", "beta")

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: "k1", Algorithm: "RS256", Use: "sig"}}})
	jwksFile := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(jwksFile, jwks, 0o644); err != nil {
		t.Fatal(err)
	}
	host := fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(t))
	srv := testbin.ServeAt(t, bin, host, []string{"PULLSECRET_HOME=" + home}, fmt.Sprintf(`allow_private_upstreams: true
aliases:
  upstream: %s
kubelet:
  issuers:
    - issuer: %s
      audience: %s
      jwks_file: %s
  bindings:
    - {namespace: team-a, service_account: builder, project: alpha}
    - {namespace: team-b, service_account: "*", project: beta}
  proxy_hosts: [%s]
`, reg.Addr(), e2eIssuer, e2eAudience, jwksFile, host))

	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: key, KeyID: "k1"}}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	saToken := func(ns, sa string) string {
		now := time.Now()
		tok, err := jwt.Signed(signer).Claims(map[string]any{
			"iss": e2eIssuer, "aud": []string{e2eAudience}, "sub": "system:serviceaccount:" + ns + ":" + sa,
			"exp": now.Add(10 * time.Minute).Unix(), "iat": now.Unix(), "nbf": now.Unix(),
			"kubernetes.io": map[string]any{"namespace": ns, "serviceaccount": map[string]string{"name": sa, "uid": "u"}},
		}).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	scheme := runtime.NewScheme()
	if err := cpv1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	decoder := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	plugin := func(image, token string) *cpv1.CredentialProviderResponse {
		t.Helper()
		req, _ := json.Marshal(cpv1.CredentialProviderRequest{
			TypeMeta: metav1.TypeMeta{APIVersion: kubelet.ProviderAPIVersion, Kind: kubelet.RequestKind},
			Image:    image, ServiceAccountToken: token,
		})
		cmd := exec.Command(filepath.Join(bin, "pullsecret-credential-provider"))
		cmd.Env = []string{"PULLSECRET_SERVER=http://" + host, "PATH=/usr/bin:/bin"}
		cmd.Stdin = bytes.NewReader(req)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("plugin: %v\n%s", err, errb.String())
		}
		obj, _, err := decoder.Decode(out.Bytes(), nil, nil)
		if err != nil {
			t.Fatalf("kubelet cannot decode %s: %v", out.String(), err)
		}
		return obj.(*cpv1.CredentialProviderResponse)
	}
	image := reg.Addr() + "/team/app"
	pullWith := func(ref, user, pass string) error {
		r, err := name.ParseReference(ref, name.Insecure)
		if err != nil {
			return err
		}
		d, err := remote.Head(r, remote.WithAuth(&authn.Basic{Username: user, Password: pass}))
		if err != nil {
			return err
		}
		if d.Digest != digest {
			return fmt.Errorf("digest %s", d.Digest)
		}
		return nil
	}
	for _, tc := range []struct{ ns, sa, user, pw string }{
		{"team-a", "builder", "alpha", e2eAlphaPW},
		{"team-b", "web", "beta", e2eBetaPW},
	} {
		resp := plugin(image, saToken(tc.ns, tc.sa))
		a, ok := resp.Auth[reg.Addr()+"/team"]
		if !ok || len(resp.Auth) != 1 || a.Username != tc.user || a.Password != tc.pw {
			t.Fatalf("%s/%s got %v", tc.ns, tc.sa, resp.Auth)
		}
		if err := pullWith(image+":v1", a.Username, a.Password); err != nil {
			t.Errorf("the credential kubelet got does not pull: %v", err)
		}
	}
	if resp := plugin(image, saToken("team-c", "web")); len(resp.Auth) != 0 {
		t.Errorf("an unbound service account got %v", resp.Auth)
	}
	// On the proxy host: a short-lived pull token that pulls through the proxy.
	resp := plugin(host+"/upstream/team/app", saToken("team-a", "builder"))
	a, ok := resp.Auth[host]
	if !ok || a.Password == e2eAlphaPW || resp.CacheDuration == nil || resp.CacheDuration.Duration <= 0 {
		t.Fatalf("proxy host answer %+v", resp)
	}
	if err := pullWith(host+"/upstream/team/app:v1", a.Username, a.Password); err != nil {
		t.Errorf("the pull token kubelet got does not pull through the proxy: %v", err)
	}
	for _, pw := range []string{e2eAlphaPW, e2eBetaPW} {
		if strings.Contains(srv.Logs(), pw) {
			t.Errorf("the server log holds a credential")
		}
	}
}
