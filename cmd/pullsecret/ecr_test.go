package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

const (
	ecrHost  = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
	ecrKeyID = "AKIAFAKECLI000000001"
	ecrRole  = "arn:aws:iam::123456789012:role/puller"
)

func TestCreateECR(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		err   string // substring of stderr; "" for success
		want  secret.AWSValue
	}{
		{name: "keys", stdin: canary + "\n", args: []string{"--ecr", "--registry", ecrHost, "--aws-access-key-id", ecrKeyID, "--aws-secret-access-key-stdin"},
			want: secret.AWSValue{AccessKeyID: ecrKeyID, SecretAccessKey: canary}},
		{name: "keys and role", stdin: canary, args: []string{"--ecr", "--registry", ecrHost, "--registry", "public.ecr.aws", "--aws-access-key-id", ecrKeyID,
			"--aws-secret-access-key-stdin", "--aws-role-arn", ecrRole, "--aws-external-id", "ext"},
			want: secret.AWSValue{AccessKeyID: ecrKeyID, SecretAccessKey: canary, RoleARN: ecrRole, ExternalID: "ext"}},
		{name: "default chain", args: []string{"--ecr", "--registry", ecrHost + "/team"}},
		{name: "profile and role", args: []string{"--ecr", "--registry", ecrHost, "--aws-profile", "prod", "--aws-role-arn", ecrRole},
			want: secret.AWSValue{Profile: "prod", RoleARN: ecrRole}},
		{name: "mirror with region", args: []string{"--ecr", "--registry", "127.0.0.1:5000", "--aws-region", "eu-west-1"},
			want: secret.AWSValue{Region: "eu-west-1"}},

		{name: "key id without secret", args: []string{"--ecr", "--registry", ecrHost, "--aws-access-key-id", ecrKeyID}, err: "--aws-secret-access-key-stdin"},
		{name: "secret without key id", stdin: canary, args: []string{"--ecr", "--registry", ecrHost, "--aws-secret-access-key-stdin"}, err: "--aws-access-key-id together"},
		{name: "aws flags without --ecr", args: []string{"--registry", ecrHost, "--aws-profile", "p", "--token-stdin"}, stdin: canary, err: "go with --ecr"},
		{name: "password with --ecr", stdin: canary, args: []string{"--ecr", "--registry", ecrHost, "--username", "u", "--password-stdin"}, err: "takes no --username"},
		{name: "not an ECR host", args: []string{"--ecr", "--registry", "ghcr.io"}, err: "not an ECR host"},
		{name: "region mismatch", args: []string{"--ecr", "--registry", ecrHost, "--aws-region", "eu-west-1"}, err: "is in region us-east-1"},
		{name: "bad role", args: []string{"--ecr", "--registry", ecrHost, "--aws-role-arn", "arn:aws:iam::1:user/x"}, err: "role ARN"},
		{name: "external id alone", args: []string{"--ecr", "--registry", ecrHost, "--aws-external-id", "x"}, err: "needs a role ARN"},
		{name: "keys and profile", stdin: canary, args: []string{"--ecr", "--registry", ecrHost, "--aws-access-key-id", ecrKeyID, "--aws-secret-access-key-stdin", "--aws-profile", "p"}, err: "not both"},
		{name: "secret key as key id", stdin: canary, args: []string{"--ecr", "--registry", ecrHost, "--aws-access-key-id", "lower-case", "--aws-secret-access-key-stdin"}, err: "access key id is not valid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			r := e.run(tc.stdin, append([]string{"secret", "create", "aws"}, tc.args...)...)
			if tc.err != "" {
				if r.code == 0 || !strings.Contains(r.stderr, tc.err) {
					t.Fatalf("want %q: exit %d\n%s", tc.err, r.code, r.stderr)
				}
				return
			}
			if r.code != 0 || !strings.Contains(r.stdout, "(ecr, project default)") {
				t.Fatalf("exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
			sec, v, err := e.store().Value(t.Context(), "", "aws")
			if err != nil || sec.Kind != secret.ECR || v.AWS == nil || *v.AWS != tc.want {
				t.Fatalf("stored %v %v (match %v)", err, sec.Kind, v.AWS != nil && *v.AWS == tc.want)
			}
			// Metadata shows no AWS field.
			if out := e.must("", "secret", "show", "aws", "-o", "json"); strings.Contains(out, "AKIA") || strings.Contains(out, "puller") {
				t.Fatalf("show prints the identity: %s", out)
			}
		})
	}
}

// The hidden exchange command answers one request, as the credential
// helper sends it, against a fake ECR. (It reads AWS_ENDPOINT_URL_ECR from
// the process environment: not parallel.)
func TestECRExchangeCommand(t *testing.T) {
	f := registry.NewFakeECR()
	defer f.Close()
	f.AddUser(ecrKeyID, canary, "arn:aws:iam::123456789012:user/ci")
	t.Setenv("AWS_ENDPOINT_URL_ECR", f.URL())
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	for _, tc := range []struct {
		secretKey, want string
	}{
		{canary, `"password":"fake-ecr-`},
		{"wrong-" + canary, `"kind":"invalid-credentials"`},
	} {
		req, _ := json.Marshal(secret.ECRRequest{Registry: secret.ECRRegistry{Service: secret.ECRPrivate, Account: "123456789012", Region: "us-east-1"},
			AWS: secret.AWSValue{AccessKeyID: ecrKeyID, SecretAccessKey: tc.secretKey}})
		var out, errb bytes.Buffer
		if code := serveECRExchange(bytes.NewReader(req), &out, &errb, func(string) string { return "" }); code != 0 {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
		if !strings.Contains(out.String(), tc.want) || strings.Contains(out.String(), canary) || errb.Len() != 0 {
			t.Fatalf("answer %s (stderr %q)", out.String(), errb.String())
		}
	}
	if code := serveECRExchange(strings.NewReader("{"), &bytes.Buffer{}, &bytes.Buffer{}, func(string) string { return "" }); code != exitError {
		t.Fatalf("bad request: exit %d", code)
	}
}
